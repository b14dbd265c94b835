#!/usr/bin/env python
"""VAE decode time and peak memory of the SD kl-f8 autoencoder, whole-image vs tiled, at 512 to 2048 pixels.

    python bench/vae_decode.py                                  # 512, 1024, 2048 px, tiled and not
    python bench/vae_decode.py --max-untiled 1024               # skip the untiled 2048 case (CPU: ~15 GiB)
    python bench/vae_decode.py --sizes 64 128 --out ''          # quick check; print only, write no file

The autoencoder is configs/autoencoder/kl-f8.yaml (SD 1.x/2.x first stage: 4 latent channels, f=8,
mid-block attention over all latent pixels) with random weights (seed 0). One image: a (1, 4, s/8, s/8)
N(0, 1) latent through `AutoencoderKL.decode`, under `torch.inference_mode()`. Tiled: `enable_tiling`
with `--tile-latent` / `--overlap-latent` (defaults 64 / 16, the model's); an image no larger than
one tile decodes whole, so tiling is a no-op at 512 px.

Each case runs in a fresh process: a warm-up decode of a 16x16 latent, then the median of `--repeats`
decodes (`--repeats-large` from 1024 px up). Peak memory: CPU: the process's peak RSS (python,
torch, the weights and the decode; the RSS before the first full-size decode is given below the table);
CUDA: `torch.cuda.max_memory_allocated` after a reset that follows the warm-up (weights included).
Cases above `--max-size`, untiled cases above `--max-untiled`, and cases that run past `--timeout`
or out of memory are reported as skipped, not fatal. `--layouts nchw channels_last` also times the
model moved with `.to(memory_format=torch.channels_last)` (txt2img's `--channels-last`).
Writes its section of bench/RESULTS.md (`--out`), one per device/dtype/layouts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from machine import RESULTS, machine, resolve_device_dtype, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GIB = 1024 ** 3


def n_tiles(latent: int, tile: int, overlap: int) -> int:
    """Tiles `AutoencoderKL` decodes a square latent in (1: decoded whole), as in autoencoder/tiling.py."""
    from autoencoder.tiling import tile_starts
    if latent <= tile:
        return 1
    stride = tile - overlap
    return len(tile_starts(latent, tile, stride)) ** 2


# -- worker: one case in this process ----------------------------------------------------------------

def run_worker(args) -> dict:
    import torch

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from common.config import read_yaml

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    config = AutoencoderConfig.from_dict(read_yaml(ROOT / "configs/autoencoder/kl-f8.yaml")["model"])
    ae = AutoencoderKL(config).eval().requires_grad_(False).to(device=device, dtype=dtype)
    if args.channels_last:
        ae.to(memory_format=torch.channels_last)
    if args.tiled:
        ae.enable_tiling(args.tile_latent, args.overlap_latent)
    f = ae.downsampling_factor
    latent = args.worker // f
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((1, config.embed_dim, latent, latent), generator=gen).to(device, dtype)
    warm = torch.randn((1, config.embed_dim, 16, 16), generator=gen).to(device, dtype)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times = []
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ae.decode(warm)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            for _ in range(args.repeats):
                start = clock()
                image = ae.decode(z)
                times.append(clock() - start)
                del image
        except torch.OutOfMemoryError:
            return {"error": "out of memory"}
        except RuntimeError as exc:  # the CPU allocator's "can't allocate memory"
            if "allocate" not in str(exc):
                raise
            return {"error": "out of memory"}
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "alloc"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"
    return {"seconds": statistics.median(times), "peak": peak, "kind": kind, "before": before,
            "upcast": any("decoding in float32" in str(w.message) for w in caught),
            "params": sum(p.numel() for p in ae.decoder.parameters()) + sum(p.numel() for p in ae.post_quant_conv.parameters())}


# -- driver ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sizes in pixels")
    parser.add_argument("--tiling", default="both", choices=["both", "off", "on"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes below 1024 px")
    parser.add_argument("--repeats-large", type=int, default=1, help="timed decodes from 1024 px up")
    parser.add_argument("--tile-latent", type=int, default=64, help="tile size in latent pixels")
    parser.add_argument("--overlap-latent", type=int, default=16, help="tile overlap in latent pixels")
    parser.add_argument("--max-size", type=int, default=0, help="skip cases above this many pixels (0: none)")
    parser.add_argument("--max-untiled", type=int, default=0, help="skip untiled cases above this many pixels (0: none)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per case before it is skipped (0: none)")
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "channels_last"],
                        help="memory layouts of the model to time")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a child: the output size of one case
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    if any(s < 8 or s % 8 for s in args.sizes) or args.repeats < 1 or args.repeats_large < 1:
        parser.error("sizes must be positive multiples of 8; repeats at least 1")
    if args.tile_latent < 1 or not 0 <= args.overlap_latent < args.tile_latent:
        parser.error("need --tile-latent >= 1 and 0 <= --overlap-latent < --tile-latent")
    import torch
    resolve_device_dtype(parser, args)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.tiling]
    rows, befores, params = [], [], None
    cases = [(size, tiled, layout) for size in args.sizes for layout in args.layouts for tiled in modes]
    for size, tiled, layout in cases:
        tiles = n_tiles(size // 8, args.tile_latent, args.overlap_latent)
        label = "off" if not tiled else (f"on, {tiles} tiles" if tiles > 1 else "on, 1 tile (no-op)")
        skip = None
        if args.max_size and size > args.max_size:
            skip = f"skipped (--max-size {args.max_size})"
        elif not tiled and args.max_untiled and size > args.max_untiled:
            skip = f"skipped (--max-untiled {args.max_untiled})"
        if skip is None:
            repeats = args.repeats if size < 1024 else args.repeats_large
            command = [sys.executable, __file__, "--worker", str(size), "--device", args.device,
                       "--dtype", args.dtype, "--repeats", str(repeats), "--tile-latent", str(args.tile_latent),
                       "--overlap-latent", str(args.overlap_latent)] + (["--tiled"] if tiled else [])
            command += ["--channels-last"] if layout == "channels_last" else []
            try:
                proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout or None)
            except subprocess.TimeoutExpired:
                skip = f"skipped (over --timeout {args.timeout:g} s)"
            else:
                if proc.returncode == -9:
                    skip = "skipped (killed: out of memory?)"
                elif proc.returncode != 0:
                    skip = f"failed (exit code {proc.returncode}, see above)"
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    skip = f"skipped ({r['error']})" if "error" in r else None
        if skip is not None:
            rows.append((size, layout, label, skip, ""))
            print(f"[{size} px, {layout}, tiling {label}] {skip}", flush=True)
            continue
        params = r["params"]
        befores.append(r["before"])
        memory = f"{r['peak'] / GIB:.2f} GiB {r['kind']}"
        seconds = f"{r['seconds']:.3f}" + (" (fp32 fallback)" if r["upcast"] else "")
        rows.append((size, layout, label, seconds, memory))
        print(f"[{size} px, {layout}, tiling {label}] {seconds} s, peak {memory}", flush=True)

    lines = ["| size | layout | tiling | seconds | peak memory |", "| --- | --- | --- | ---: | ---: |"]
    lines += [f"| {size}x{size} | {layout} | {label} | {seconds} | {memory} |"
              for size, layout, label, seconds, memory in rows]
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    print()
    print(table)
    print(f"\n{elapsed:.0f} s")
    if not args.out:
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    command = "python bench/vae_decode.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    if args.device == "cuda":
        memory_note = "Peak memory: `max_memory_allocated` after the warm-up, weights included."
    elif befores:
        memory_note = (f"Peak memory: peak RSS of a fresh process per case; before the first full-size decode it was "
                       f"{min(befores) / GIB:.2f}-{max(befores) / GIB:.2f} GiB (python, torch, weights, warm-up).")
    else:
        memory_note = "Peak memory: peak RSS of a fresh process per case."
    decoder = f" ({params / 1e6:.0f}M decoder parameters)" if params else ""
    text = f"""## VAE decode: {args.dtype} on {device}

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device},
dtype {args.dtype}. SD kl-f8 autoencoder{decoder}, random weights, batch 1.
Tiles of {args.tile_latent} latent pixels with {args.overlap_latent} overlap.
Median of {args.repeats} decodes below 1024 px, {args.repeats_large} from 1024 px up, after a 16x16-latent warm-up.
{memory_note}
Total run time {elapsed:.0f} s.

{table}
"""
    write_section(f"vae_decode {args.device} {args.dtype} {' '.join(args.layouts)}", text, args.out)


if __name__ == "__main__":
    main()
