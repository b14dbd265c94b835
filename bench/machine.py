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


RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
HEADER = """# Benchmark results

Each section below is the latest run of one benchmark (and device), written by the script itself: the
command, date, machine and versions are in the section. Re-running a command replaces its section and
leaves the others; older runs are in git history. See bench/README.md for what each one measures.
"""


def write_section(key: str, text: str, path: str | Path = RESULTS) -> None:
    """Put one run's Markdown into `path` (bench/RESULTS.md) as section `key`, replacing that key's last run.

    The file is rewritten atomically (a temp file, then a rename), so a crash never leaves half a file.
    """
    out = Path(path)
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = out.read_text() if out.is_file() else HEADER
    if begin in old and end in old[old.index(begin):]:
        start = old.index(begin)
        stop = old.index(end, start) + len(end)
        new = old[:start] + block + old[stop:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, out)
    print(f"wrote section '{key}' of {out}")


def resolve_device_dtype(parser, args) -> None:
    """`--device auto` -> cuda when available, else cpu; `--dtype auto` -> bf16 on CUDA, fp32 on the CPU."""
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
