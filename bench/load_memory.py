#!/usr/bin/env python
"""Peak memory of loading an SD-size checkpoint: ours (parameters assigned from the file) vs the naive way.

    python bench/load_memory.py            # SD 1.x layout (UNet + VAE, 944M parameters, 3.8 GB in fp32)

It writes a random-weight original-format checkpoint with the full SD 1.x UNet and VAE once (cached
in the system temp folder), then loads it in fresh processes and reports each one's peak resident
memory (ru_maxrss) after every weight has been read once: `ldm.load_model`, and the naive path (build the model with random init, read
the file, copy into the parameters), which holds the weights twice. Writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import RESULTS, machine, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent

MEASURE = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch
path, mode = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "ours":
    import ldm
    model = ldm.load_model(path)
else:
    from ldm.checkpoint import read_checkpoint, strip_prefix
    from ldm.config import from_original_config
    from ldm.model import LatentDiffusion
    from ldm.original_configs import infer_original_config
    tensors, _ = read_checkpoint(path)
    model = LatentDiffusion(from_original_config(infer_original_config(tensors)))
    model.autoencoder.load_state_dict(strip_prefix(tensors, "first_stage_model."))
    model.denoiser.load_state_dict(strip_prefix(tensors, "model.diffusion_model."))
seconds = time.perf_counter() - start
# Read every weight once: a loader may hand out memory-mapped tensors whose pages only count (and
# only cost) once used, and a model is loaded to be used.
checksum = sum(p.double().sum().item() for p in model.parameters())
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kib": base,
                  "param_bytes": params, "seconds": seconds}))
"""


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS), help="results file ('' to skip)")
    args = p.parse_args()
    path = Path(tempfile.gettempdir()) / "ldm-bench-sd-v1-random.safetensors"
    if not path.is_file():
        print(f"writing a random SD 1.x-layout checkpoint to {path} ...", flush=True)
        make_checkpoint(path)
    rows = []
    for mode in ("ours", "naive"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True, check=True)
        rows.append((mode, json.loads(out.stdout.strip().splitlines()[-1])))
    gib = 1024 ** 3
    lines = ["| loader | weights (GiB) | peak RSS (GiB) | peak / weights | load time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for mode, r in rows:
        name = "ldm.load_model (assign)" if mode == "ours" else "naive (init + read + copy)"
        peak = r["peak_kib"] * 1024
        lines.append(f"| {name} | {r['param_bytes'] / gib:.2f} | {peak / gib:.2f} | {peak / r['param_bytes']:.2f} | "
                     f"{r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        import torch
        header = (f"## Checkpoint loading memory\n\n`python bench/load_memory.py`, {datetime.date.today()}, "
                  f"{machine()}, torch {torch.__version__}. "
                  f"SD 1.x-layout UNet + VAE, random weights, float32 .safetensors ({path.stat().st_size / gib:.2f} GiB).\n\n")
        write_section("load_memory", header + table, args.out)


if __name__ == "__main__":
    main()
