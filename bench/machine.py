"""What machine a benchmark ran on, for the results files (run the scripts from the repo root)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """'Linux x86_64, <CPU model>, N cores'."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def append_results(path: str | Path, title: str, text: str) -> None:
    """Append a run's section to a results file, starting the file with `title` when it is new."""
    out = Path(path)
    if not out.is_file():
        text = f"# {title}\n" + text
    with out.open("a") as fh:
        fh.write(text)
    print(f"appended to {out}")


def resolve_device_dtype(parser, args) -> None:
    """`--device auto` -> cuda when available, else cpu; `--dtype auto` -> bf16 on CUDA, fp32 on the CPU."""
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
