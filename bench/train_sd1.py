#!/usr/bin/env python
"""Training images/s of an SD-v1-layout UNet at 32x32 latents: gradient checkpointing and latent caching on/off.

    python bench/train_sd1.py                  # 4 cases, 3 timed steps each: about 6 min on 2 CPU cores
    python bench/train_sd1.py --steps 1 --out ''   # a quick look; print only
    python bench/train_sd1.py --device cuda    # on a GPU (bf16 autocast by default there)

The model is `ldm.original_configs.SD_V1` with random weights: the 860M-parameter UNet (trained),
the CLIP ViT-L/14 text encoder in open_clip form and the kl-f8 autoencoder (both frozen), as SD
fine-tuning has them. The data are `--batch` 256x256 crops of real photographs (the tests'
scikit-image samples) with captions, so the latents are 4x32x32.

One training step is what tools/train_ldm.py does per step, with its own parts
(`ldm.training.Trainable`, `ldm.diffusion.diffusion_loss`, fused AdamW, gradient clipping at 1.0):
- without latent caching: encode the images (`model.encode_images`: kl-f8 encoder, posterior
  sample) and the captions (CLIP ViT-L) every step, then the UNet's forward and backward;
- with latent caching: latents and text contexts computed once, as tools/encode_latents.py stores
  them; each step draws z from the cached mean and std and runs the UNet's forward and backward;
- gradient checkpointing: `use_checkpoint` on every ResBlock and transformer block (train.gradient_checkpointing).
No EMA copy: at 860M parameters the weights, gradients and AdamW's two moments already take about
14 GB, and an EMA would add 3.4 GB more, which a 24 GB machine cannot spare beside activations.

Each case runs in a fresh process (so its peak RSS is its own): one warm-up step, then `--steps`
timed steps; images/s = batch / median step time. Writes its section of bench/RESULTS.md.
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
from pathlib import Path

from machine import RESULTS, machine, resolve_device_dtype, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # write_real_images: the tests' real-photo crops

CAPTIONS = ["a photograph of an astronaut riding a horse", "a red apple on a wooden table",
            "an oil painting of a lighthouse at dusk", "a cat sleeping on a windowsill"]
CASES = [(False, False), (True, False), (False, True), (True, True)]  # (latent caching, gradient checkpointing)
GIB = 1024 ** 3


def run_worker(args) -> dict:
    import contextlib
    import copy
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from ldm import diffusion
    from ldm.formats.configs import from_original_config
    from ldm.formats.original_configs import SD_V1
    from ldm.model import LatentDiffusion
    from ldm.training.trainable import Trainable

    from helpers import write_real_images

    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    start = time.perf_counter()
    config = copy.deepcopy(SD_V1)
    config["model"]["params"]["unet_config"]["params"]["use_checkpoint"] = False
    model = LatentDiffusion(from_original_config(config))
    model.autoencoder.requires_grad_(False).eval()
    model.text_encoder.requires_grad_(False).eval()
    if args.checkpointing:
        for module in model.denoiser.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = True
    model.to(device)
    trainable = Trainable(model.denoiser).to(device).train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type in ("cpu", "cuda"))
    build_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_real_images(Path(tmp), args.batch, size=256)
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    captions = [CAPTIONS[k % len(CAPTIONS)] for k in range(args.batch)]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    cached = None
    if args.cached:  # what tools/encode_latents.py stores: the posterior's mean and std, and the contexts
        with torch.no_grad(), autocast():
            posterior = model.autoencoder.encode(images)
            cached = (posterior.mean.float(), posterior.std.float(), model.text_encoder.encode(captions).float())

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step() -> float:
        t0 = clock()
        with torch.no_grad(), autocast():
            if cached is None:
                latents = model.encode_images(images).float()
                context = model.text_encoder.encode(captions).float()
            else:
                mean, std, context = cached
                latents = model.latents_from_posterior(mean, std)
        with autocast():
            loss, _ = diffusion.diffusion_loss(lambda x, t: trainable(x, t, context=context), latents, model.schedule,
                                               parameterization=model.parameterization)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = step()
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "alloc"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"
    return {"build_s": build_s, "warm_s": warm, "step_s": statistics.median(times), "peak": peak, "kind": kind,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (auto: fp32 on the CPU, bf16 on CUDA); weights stay fp32")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be >= 1")
    import torch
    resolve_device_dtype(parser, args)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    rows = []
    for cached, checkpointing in CASES:
        name = f"latent caching {'on' if cached else 'off'}, gradient checkpointing {'on' if checkpointing else 'off'}"
        command = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--steps", str(args.steps),
                   "--device", args.device, "--dtype", args.dtype]
        command += ["--cached"] * cached + ["--checkpointing"] * checkpointing
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode} (see above)"
            print(f"[{name}] failed: {why}", flush=True)
            rows.append({"cached": cached, "checkpointing": checkpointing, "error": why})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(cached=cached, checkpointing=checkpointing)
        rows.append(r)
        print(f"[{name}] {r['step_s']:.2f} s/step, {args.batch / r['step_s']:.3f} images/s, "
              f"peak {r['peak'] / GIB:.1f} GiB {r['kind']} (build {r['build_s']:.0f} s)", flush=True)

    base = next((r["step_s"] for r in rows if "error" not in r and not r["cached"] and not r["checkpointing"]), None)
    lines = ["| latent caching | gradient checkpointing | s/step | images/s | vs neither | peak memory |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        flags = f"| {'on' if r['cached'] else 'off'} | {'on' if r['checkpointing'] else 'off'} "
        if "error" in r:
            lines.append(flags + f"| {r['error']} | | | |")
            continue
        speed = f"{base / r['step_s']:.2f}x" if base else ""
        lines.append(flags + f"| {r['step_s']:.2f} | {args.batch / r['step_s']:.3f} | {speed} "
                     f"| {r['peak'] / GIB:.1f} GiB {r['kind']} |")
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    print()
    print(table)
    print(f"\n{elapsed:.0f} s")
    if not args.out:
        return
    trainable = next((r["trainable"] for r in rows if "trainable" in r), 0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    threads = f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""
    command = "python bench/train_sd1.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    text = f"""## Training an SD-v1-layout UNet at 32x32 latents ({args.dtype} on {device})

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__}{threads}. Total run time {elapsed:.0f} s.

SD-v1 layout with random weights: UNet trained ({trainable / 1e6:.0f}M parameters, fused AdamW, clipping 1.0), CLIP
ViT-L/14 text encoder and kl-f8 autoencoder frozen; batch {args.batch} of 256x256 real-photo crops (4x32x32
latents), eps loss; {"autocast " + args.dtype if args.dtype != "fp32" else "fp32"}; no EMA. Without caching a step
also encodes the images and captions. Median of {args.steps} steps after a warm-up step; each case in a fresh
process (peak: {"max_memory_allocated" if args.device == "cuda" else "peak RSS, python and all three models included"}).

{table}
"""
    write_section(f"train_sd1 {args.device} {args.dtype}", text, args.out)


if __name__ == "__main__":
    main()
