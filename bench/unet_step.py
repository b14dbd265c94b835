#!/usr/bin/env python
"""Speed of one SD UNet step on CPU: ours (`ldm.unet.UNetModel`) vs diffusers' `UNet2DConditionModel`.

    python bench/unet_step.py                       # SD-v1 and SD-v2 layouts, latent 32x32
    python bench/unet_step.py --sizes 32 64         # also 64x64 (512 px; several seconds a step)
    python bench/unet_step.py --repeats 3 --out ''  # fewer repeats; print only, write no file

For each layout (the full-size `unet_config` of `ldm.original_configs.SD_V1` / `SD_V2`,
`use_checkpoint` off) it builds our UNet with random weights (seed 0). The original init zeroes
the output convs, which would make both outputs exactly 0, so every all-zero parameter is refilled
with random values (seed 1) before the comparison. The same original-format state dict (keys
`model.diffusion_model.*`) goes through diffusers' own converter
(`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`) into a
`UNet2DConditionModel`. The diffusers model is built on the meta device and takes the converted
tensors by assignment, so the two models share weight storage where the converter did not copy.

One step: batch 2 (classifier-free guidance), fp32, CPU, `torch.inference_mode()`, timestep 500,
context (2, 77, 768) for v1 and (2, 77, 1024) for v2. The first call of each model is the warm-up,
and its outputs give the max abs difference between the two. Then the median wall time of
`--repeats` calls (64x64: `--repeats-64`). FLOPs per step come from
`torch.utils.flop_counter.FlopCounterMode` on our model (matmuls, convs and SDPA; elementwise ops
and norms are not counted). The peak is the median time of a 2048x2048 fp32 `torch.mm`.
Writes bench/RESULTS-unet.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

from machine import machine  # bench/machine.py

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PREFIX = "model.diffusion_model."


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mm_peak() -> float:
    """Achieved GFLOP/s of a 2048x2048 fp32 matmul (median of 10 after a warm-up)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        torch.mm(a, b)
        ms = timed(lambda: torch.mm(a, b), 10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


def build(name: str, original: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    from ldm.unet import UNetConfig, UNetModel

    original = copy.deepcopy(original)
    params = original["model"]["params"]["unet_config"]["params"]
    params["use_checkpoint"] = False
    torch.manual_seed(0)
    ours = UNetModel(UNetConfig.from_original(params)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.any():  # zero-initialised output convs: refill so the comparison means something
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = create_unet_diffusers_config_from_ldm(original, checkpoint)
        converted = convert_ldm_unet_checkpoint(checkpoint, config)
    del checkpoint
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    missing, unexpected = theirs.load_state_dict(converted, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    theirs.eval()
    print(f"[{name}] built: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters", flush=True)
    return ours, theirs, params["context_dim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="latent sizes (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls at sizes below 64 (default 5)")
    parser.add_argument("--repeats-64", type=int, default=2, help="timed calls at 64 and above (default 2)")
    parser.add_argument("--layouts", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--out", default=str(HERE / "RESULTS-unet.md"), help="results file ('' = print only)")
    args = parser.parse_args()
    if any(s % 8 or s <= 0 for s in args.sizes) or args.repeats < 1 or args.repeats_64 < 1:
        parser.error("sizes must be positive multiples of 8; repeats at least 1")

    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.original_configs import SD_V1, SD_V2

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak = mm_peak()
    print(f"fp32 mm 2048x2048: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)

    rows = []
    for name in args.layouts:
        ours, theirs, context_dim = build(name, SD_V1 if name == "v1" else SD_V2)
        for size in args.sizes:
            repeats = args.repeats if size < 64 else args.repeats_64
            gen = torch.Generator().manual_seed(2)
            x = torch.randn(2, 4, size, size, generator=gen)
            ctx = torch.randn(2, 77, context_dim, generator=gen)
            t = torch.tensor([500, 500])
            with torch.inference_mode():
                a = ours(x, t, ctx)  # warm-up + comparison
                b = theirs(x, t, encoder_hidden_states=ctx).sample
                diff = (a - b).abs().max().item()
                scale = a.abs().max().item()
                ours_ms = timed(lambda: ours(x, t, ctx), repeats)
                theirs_ms = timed(lambda: theirs(x, t, encoder_hidden_states=ctx), repeats)
                with FlopCounterMode(display=False) as counter:
                    ours(x, t, ctx)
            gflop = counter.get_total_flops() / 1e9
            achieved = gflop / (ours_ms * 1e-3)
            row = {"layout": f"SD-{name}", "size": size, "ours": ours_ms, "theirs": theirs_ms, "gflop": gflop,
                   "gflops": achieved, "pct": 100 * achieved / peak, "diff": diff, "scale": scale,
                   "repeats": repeats}
            rows.append(row)
            print(f"[{name} {size}x{size}] ours {ours_ms:.0f} ms, diffusers {theirs_ms:.0f} ms, {gflop:.0f} GFLOP, "
                  f"max abs diff {diff:.2e} (output max {scale:.2f})", flush=True)
        del ours, theirs
        gc.collect()

    lines = ["| layout | latent | ours ms | diffusers ms | ours / diffusers | GFLOP per step | ours GFLOP/s "
             "| % of mm peak | max abs diff |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['size']}x{r['size']} | {r['ours']:.0f} | {r['theirs']:.0f} "
                     f"| {r['ours'] / r['theirs']:.3f} | {r['gflop']:.0f} | {r['gflops']:.1f} | {r['pct']:.0f}% "
                     f"| {r['diff']:.1e} |")
    table = "\n".join(lines)
    print()
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s")
    if not args.out:
        return
    command = "python bench/unet_step.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    repeats = ", ".join(f"{r['size']}x{r['size']}: {r['repeats']}" for r in {r["size"]: r for r in rows}.values())
    text = f"""# One UNet step on CPU: ours vs diffusers

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}. Total run time {elapsed:.0f} s.

Full-size SD-v1 / SD-v2 UNet layouts (860M / 866M parameters), random weights shared by both models, batch 2
(CFG), fp32, `torch.inference_mode()`, timestep 500, context 77 tokens. Median of timed calls after
one warm-up call ({repeats}). GFLOP per step is from `FlopCounterMode` on our model (matmuls, convs,
attention; elementwise work not counted). Peak: a 2048x2048 fp32 `torch.mm` at {peak:.1f} GFLOP/s.
Max abs diff is between the two models' outputs on the warm-up call (outputs reach about
{max(r['scale'] for r in rows):.1f} in absolute value).

{table}
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
