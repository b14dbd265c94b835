#!/usr/bin/env python
"""Peak memory of loading an SD-size checkpoint: ours (parameters assigned from the file) vs the naive way.

    python bench/load_memory.py                 # SD 1.x layout (UNet + VAE, 944M parameters, 3.8 GB in fp32)
    python bench/load_memory.py --layout xl     # SDXL base, all parts, float16 as released (6.9 GB file)

It writes a random-weight original-format checkpoint once (cached in the system temp folder), then
loads it in fresh processes and reports each one's peak resident memory (ru_maxrss) after every
weight has been read once: `ldm.load_model`, and the naive path (build the model with random init,
read the file, copy into the parameters), which holds the weights twice. Writes its section of
bench/RESULTS.md.

- sd1: the full SD 1.x UNet and VAE, float32 (3.5 GiB).
- xl: the full SDXL base model as released (`ldm.formats.sgm.SDXL_BASE`: UNet, VAE, CLIP ViT-L and
  OpenCLIP bigG text towers; 3.47B parameters) in float16 under its original key names
  (`model.diffusion_model.`, `first_stage_model.`, `conditioner.`), written tensor by tensor so the
  writer never holds the weights. Loaded three ways: `ldm.load_model(path)` (float32, its default),
  `ldm.load_model(path, dtype=torch.float16)`, and the naive path in float32. A float32 case whose
  anonymous memory (its float32 weights) would not fit in the machine's available memory is skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import RESULTS, machine, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
GIB = 1024 ** 3

MEASURE = r"""
import json, resource, sys, threading, time, warnings
warnings.simplefilter("ignore")
import torch
path, mode = sys.argv[1], sys.argv[2]
# ru_maxrss counts file-backed pages too (a memory-mapped checkpoint's pages, once read), which the kernel
# can drop under pressure; anonymous memory cannot be dropped. Sample its peak every 10 ms.
peak_anon = [0]
def sample_anon():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=sample_anon, daemon=True).start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "ours":
    import ldm
    model = ldm.load_model(path)
elif mode == "ours_fp16":
    import ldm
    model = ldm.load_model(path, dtype=torch.float16)
else:
    from common.checkpoint import read_checkpoint, strip_prefix
    from ldm.formats.configs import from_original_config
    from ldm.formats.original_configs import infer_original_config
    from ldm.formats.sgm import from_sgm_config, infer_sgm_config, is_sdxl_file
    from ldm.model import LatentDiffusion
    tensors, _ = read_checkpoint(path)
    sdxl = is_sdxl_file(tensors)
    model = LatentDiffusion(from_sgm_config(infer_sgm_config(tensors)) if sdxl
                           else from_original_config(infer_original_config(tensors)))
    model.autoencoder.load_state_dict(strip_prefix(tensors, "first_stage_model."))
    model.denoiser.load_state_dict(strip_prefix(tensors, "model.diffusion_model."))
    if sdxl:
        model.text_encoder.load_state_dict(strip_prefix(tensors, "conditioner."))
seconds = time.perf_counter() - start
# Read every weight once: a loader may hand out memory-mapped tensors whose pages only count (and
# only cost) once used, and a model is loaded to be used.
checksum = sum(p.double().sum().item() for p in model.parameters())
params = sum(p.numel() * p.element_size() for p in model.parameters())
status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
          if line.startswith(("RssAnon", "RssFile"))}
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kib": base,
                  "param_bytes": params, "seconds": seconds, "anon_kib": status.get("RssAnon"),
                  "file_kib": status.get("RssFile"), "peak_anon_kib": peak_anon[0]}))
"""

FILES = {"sd1": "ldm-bench-sd-v1-random.safetensors", "xl": "ldm-bench-sdxl-base-random-fp16.safetensors"}
MODES = {"sd1": ("ours", "naive"), "xl": ("ours", "ours_fp16", "naive")}
NAMES = {"ours": "ldm.load_model (assign)", "ours_fp16": "ldm.load_model(dtype=torch.float16)",
         "naive": "naive (init + read + copy)"}
# original key prefix of each part of our LatentDiffusion
ORIGINAL_PREFIXES = {"autoencoder.": "first_stage_model.", "denoiser.": "model.diffusion_model.",
                     "text_encoder.": "conditioner."}


def make_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ldm.formats.configs import from_original_config
    from ldm.formats.original_configs import SD_V1
    from ldm.model import LatentDiffusion

    config = json.loads(json.dumps(SD_V1))
    config["model"]["params"].pop("cond_stage_config")
    with torch.device("meta"):
        model = LatentDiffusion(from_original_config(config))
    names = {"autoencoder.": "first_stage_model.", "denoiser.": "model.diffusion_model."}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in names if key.startswith(p)), None)
        name = names[prefix] + key[len(prefix):] if prefix else key
        tensors[name] = torch.randn(value.shape, generator=g) * 0.02
    save_file(tensors, str(path))


def sdxl_layout() -> dict:
    """Original name -> (shape, dtype) of a released SDXL base file, from our model built on the meta device."""
    import torch

    import ldm
    from ldm.formats.sgm import SDXL_BASE, from_sgm_config

    with torch.device("meta"):
        model = ldm.LatentDiffusion(from_sgm_config(SDXL_BASE))
    layout = {}
    for key, value in model.state_dict().items():
        if key == "alphas_cumprod":  # ours; sgm derives its sigmas and released files have none
            continue
        prefix = next(p for p in ORIGINAL_PREFIXES if key.startswith(p))
        layout[ORIGINAL_PREFIXES[prefix] + key[len(prefix):]] = (tuple(value.shape), value.dtype)
    return layout


def make_sdxl_checkpoint(path: Path, layout: dict) -> None:
    """A random-weight SDXL base file, float16 as released (int64 position_ids stay arange), written one
    tensor at a time in the safetensors format (8-byte header length, JSON header, data), through a temp
    file and a rename, so that neither memory nor an interrupted run holds or leaves a whole copy."""
    import math
    import struct

    import torch

    codes = {torch.float16: "F16", torch.int64: "I64"}
    header, offset, dtypes = {"__metadata__": {"note": "random weights (bench/load_memory.py)"}}, 0, {}
    for name, (shape, dtype) in layout.items():
        dtypes[name] = torch.float16 if dtype.is_floating_point else dtype
        size = math.prod(shape) * dtypes[name].itemsize
        header[name] = {"dtype": codes[dtypes[name]], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, (shape, _) in layout.items():
            if dtypes[name] == torch.int64:  # CLIP's position_ids buffer: 0..76
                value = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
            else:
                value = (torch.randn(shape, generator=g) * 0.02).half()
            f.write(value.numpy().tobytes())
    os.replace(tmp, path)


def mem_available() -> int:
    """MemAvailable in bytes (0 where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="sd1", choices=list(FILES),
                   help="sd1 (default: UNet + VAE, float32) or xl (SDXL base, all parts, float16 file)")
    p.add_argument("--out", default=str(RESULTS), help="results file ('' to skip)")
    args = p.parse_args()
    path = Path(tempfile.gettempdir()) / FILES[args.layout]
    available_at_start = mem_available()
    fp32_bytes = None
    if args.layout == "xl":
        import math
        layout = sdxl_layout()
        numel = sum(math.prod(shape) for shape, dtype in layout.values() if dtype.is_floating_point)
        fp32_bytes = 4 * numel
        size = sum(math.prod(shape) * (2 if dtype.is_floating_point else 8) for shape, dtype in layout.values())
        if not path.is_file() or path.stat().st_size < size:
            free = shutil.disk_usage(path.parent).free
            if free < size + 4 * GIB:
                sys.exit(f"error: {path.parent} has {free / GIB:.1f} GiB free; the SDXL checkpoint needs "
                         f"{size / GIB:.1f} GiB (+4 GiB to spare): free some space or set TMPDIR")
            print(f"writing a random SDXL base checkpoint ({numel / 1e9:.2f}B parameters, float16, "
                  f"{size / GIB:.2f} GiB) to {path} ...", flush=True)
            make_sdxl_checkpoint(path, layout)
    elif not path.is_file():
        print(f"writing a random SD 1.x-layout checkpoint to {path} ...", flush=True)
        make_checkpoint(path)
    rows, skipped = [], []
    for mode in MODES[args.layout]:
        available = mem_available()
        if fp32_bytes and mode != "ours_fp16" and available and available < fp32_bytes + 2 * GIB:
            skipped.append(f"{NAMES[mode]}: skipped, its float32 weights ({fp32_bytes / GIB:.1f} GiB) + 2 GiB do not "
                           f"fit in the {available / GIB:.1f} GiB available now")
            print(skipped[-1], flush=True)
            continue
        print(f"loading: {NAMES[mode]} ...", flush=True)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True,
                             check=True, cwd=HERE.parent)
        rows.append((mode, json.loads(out.stdout.strip().splitlines()[-1])))
    if args.layout == "xl":
        lines = ["| loader | weights (GiB) | peak RSS (GiB) | peak / weights | load time (s) "
                 "| peak anonymous (GiB, sampled) | RSS after: anonymous / file-backed (GiB) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines = ["| loader | weights (GiB) | peak RSS (GiB) | peak / weights | load time (s) |",
                 "| --- | ---: | ---: | ---: | ---: |"]
    for mode, r in rows:
        peak = r["peak_kib"] * 1024
        line = (f"| {NAMES[mode]} | {r['param_bytes'] / GIB:.2f} | {peak / GIB:.2f} | {peak / r['param_bytes']:.2f} | "
                f"{r['seconds']:.1f} |")
        if args.layout == "xl":
            line += (f" {r['peak_anon_kib'] * 1024 / GIB:.2f} | {r['anon_kib'] * 1024 / GIB:.2f} / "
                     f"{r['file_kib'] * 1024 / GIB:.2f} |")
        lines.append(line)
    table = "\n".join(lines + ([""] + skipped if skipped else []))
    print(table)
    if args.out:
        import torch
        size = path.stat().st_size / GIB
        if args.layout == "xl":
            header = (f"## Checkpoint loading memory: SDXL base\n\n`python bench/load_memory.py --layout xl`, "
                      f"{datetime.date.today()}, {machine()}, torch {torch.__version__}. "
                      f"SDXL base (UNet, VAE, CLIP ViT-L + OpenCLIP bigG), random weights, original key names, "
                      f"float16 .safetensors ({size:.2f} GiB), memory available at the start "
                      f"{available_at_start / GIB:.1f} GiB.\n\n")
            write_section("load_memory xl", header + table, args.out)
        else:
            header = (f"## Checkpoint loading memory\n\n`python bench/load_memory.py`, {datetime.date.today()}, "
                      f"{machine()}, torch {torch.__version__}. "
                      f"SD 1.x-layout UNet + VAE, random weights, float32 .safetensors ({size:.2f} GiB).\n\n")
            write_section("load_memory", header + table, args.out)


if __name__ == "__main__":
    main()
