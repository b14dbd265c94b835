#!/usr/bin/env python
"""Text-to-image time per image, split into text encoding, the sampling loop, the denoiser and the VAE decode.

    python bench/txt2img.py                                   # default model and SD-v1 at 512x512, DDIM 50 steps
    python bench/txt2img.py --models sd1 --repeats 1          # SD-v1 only, one timed image (CPU: ~10 min)
    python bench/txt2img.py --models default --steps 3 --out ''   # quick check; print only, write no file

Models (random weights unless stated; everything is built offline):
- `default`: the embedded default model, `ldm.load_model()`. Where ldm/weights/default.safetensors is
  missing, the same architecture from configs/ldm/emoji.yaml with a random UNet and text encoder; its
  autoencoder is runs/emoji-ae/autoencoder.safetensors when that exists, else the f4 architecture of
  configs/autoencoder/emoji.yaml with random weights. The output says which.
- `sd1`: `ldm.original_configs.SD_V1` (860M UNet, CLIP ViT-L text encoder in open_clip form, kl-f8
  VAE) at `--size` pixels (default 512: 64x64 latents).
The UNet's zero-initialised output conv is refilled with random values, so guidance does real arithmetic.

One image per pass: prompt and "" encoded separately (cond, uncond), DDIM (eta 0) with
classifier-free guidance 7.5 (the denoiser sees batch 2), then the VAE decode, all under
`torch.inference_mode()`. One warm-up pass (2 steps) first, then `--repeats` timed passes (medians).
The steps column is the number of denoiser calls: the original DDIM spacing gives 4 for `--steps 3`.
- model s/step: the median of up to 10 lone denoiser calls (batch 2) outside the loop.
- sampler overhead: the same DDIM loop with the denoiser replaced by a stub that returns a
  precomputed tensor (CFG concatenation and combination, DDIM update, timestep handling), per step,
  as a % of model s/step. The residual (loop - steps x model s/step) / steps is printed beside it as
  a cross-check; it is noisy on a loaded CPU.
- peak mem: CPU: peak RSS of the process (each model runs in its own fresh process); CUDA:
  `torch.cuda.max_memory_allocated` (weights included), reset once the model is on the device.
- it/s: denoiser steps per second, 1 / model s/step (one image with CFG: batch 2).
`--channels-last` lays the model out channels-last and `--compile` torch.compiles its denoiser (the
warm-up pass pays the compile time), as txt2img's flags of the same names do.
Writes its section of bench/RESULTS.md (`--out`), one per models/device/dtype/options.
"""
from __future__ import annotations

import argparse
import copy
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

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE_SCALE = 7.5
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MODELS = ("default", "sd1")


# -- worker: one model in this process ---------------------------------------------------------------

def refill_zero_parameters(module, seed: int = 1) -> None:
    """Refill all-zero parameters (the UNet's output conv) with random values of scale 1/sqrt(fan_in)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def build_default():
    """(model, description): the embedded default model, or its architecture with random weights."""
    import ldm
    from common.config import read_yaml
    from ldm.formats.loading import DEFAULT_MODEL, model_from_training_config

    if DEFAULT_MODEL.is_file():
        return ldm.load_model(), "default (trained weights)"
    section = dict(read_yaml(ROOT / "configs/ldm/emoji.yaml")["model"])
    ae_ckpt = ROOT / section["autoencoder_ckpt"]
    if ae_ckpt.is_file():
        section["autoencoder_ckpt"] = str(ae_ckpt)
        ae_note = "trained autoencoder"
    else:
        section["autoencoder_ckpt"] = None
        section["autoencoder"] = read_yaml(ROOT / "configs/autoencoder/emoji.yaml")["model"]
        section["random_autoencoder"] = True  # a timing run: random weights are what it asks for
        ae_note = "random autoencoder"
    print(f"note: {DEFAULT_MODEL.relative_to(ROOT)} is missing: timing configs/ldm/emoji.yaml with a random UNet "
          f"and text encoder and a {ae_note}", file=sys.stderr, flush=True)
    model = model_from_training_config(section)
    refill_zero_parameters(model.denoiser)
    return model, f"emoji config, random UNet + text, {ae_note} (default.safetensors missing)"


def build_sd1():
    from ldm.formats.configs import from_original_config
    from ldm.formats.original_configs import SD_V1
    from ldm.model import LatentDiffusion

    config = copy.deepcopy(SD_V1)
    config["model"]["params"]["unet_config"]["params"]["use_checkpoint"] = False
    model = LatentDiffusion(from_original_config(config))
    refill_zero_parameters(model.denoiser)
    return model, "SD-v1 layout, random weights"


def run_worker(args) -> dict:
    import torch

    from ldm import samplers

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    started = time.perf_counter()
    model, description = build_default() if args.worker == "default" else build_sd1()
    model = model.eval().requires_grad_(False).to(device=device)
    if device.type == "cpu" and dtype == torch.bfloat16:  # as txt2img --precision bf16 on the CPU
        from ldm.cli import cast_for_cpu_bf16
        cast_for_cpu_bf16(model)  # the denoiser's weights only; sampler, text encoder and VAE in fp32
        dtype = torch.float32  # the sampler's and the VAE's dtype
    else:
        model = model.to(dtype=dtype)
    weights = next(model.denoiser.parameters()).dtype
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        from ldm.cli.generate import compile_denoiser
        compile_denoiser(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{args.worker}] built in {time.perf_counter() - started:.0f} s: {description}, {params / 1e6:.0f}M parameters",
          file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    f = model.autoencoder.downsampling_factor
    size = args.size if args.worker == "sd1" else (model.config.image_size or model.config.autoencoder.resolution // f) * f
    if size % f:
        raise SystemExit(f"--size {size} is not a multiple of the autoencoder's factor {f}")
    latent = size // f
    channels = model.config.autoencoder.embed_dim
    x_T = torch.randn((1, channels, latent, latent), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    n_steps = len(samplers.plan(args.sampler, model.schedule, args.steps).timesteps)  # denoiser calls per image

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def one_image(steps: int) -> dict:
        t0 = clock()
        cond = model.text_encoder.encode([PROMPT]).to(device, dtype)
        uncond = model.text_encoder.encode([""]).to(device, dtype)
        t1 = clock()
        latents = model.sample(cond, uncond, x_T=x_T, sampler=args.sampler, steps=steps, guidance_scale=GUIDANCE_SCALE)
        t2 = clock()
        images = model.decode_latents(latents)
        t3 = clock()
        return {"text": t1 - t0, "loop": t2 - t1, "decode": t3 - t2, "total": t3 - t0,
                "finite": bool(torch.isfinite(images).all()), "cond": cond, "uncond": uncond}

    with torch.inference_mode():
        one_image(2)  # warm-up: tokenizer, kernels, allocator
        runs = []
        for r in range(args.repeats):
            runs.append(one_image(args.steps))
            print(f"[{args.worker}] pass {r + 1}/{args.repeats}: {runs[-1]['total']:.2f} s", file=sys.stderr, flush=True)
        cond, uncond = runs[-1]["cond"], runs[-1]["uncond"]

        # The denoiser alone, as the guided model function calls it: batch [uncond, cond].
        x2, t2, context = torch.cat([x_T, x_T]).to(weights), torch.full((2,), 500, device=device), torch.cat([uncond, cond]).to(weights)
        model_times = []
        for _ in range(min(n_steps, 10)):
            start = clock()
            out = model.denoiser(x2, t2, context)
            model_times.append(clock() - start)

        # The loop alone: the same sampler call with a stub denoiser returning a precomputed output.
        stub_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)  # sampler dtype
        stub_fn = samplers.guided_model_fn(lambda x, t, **_: stub_out, cond, uncond, guidance_scale=GUIDANCE_SCALE)
        stub_times = []
        for _ in range(max(5, args.repeats)):
            start = clock()
            samplers.sample(stub_fn, x_T, model.schedule, sampler=args.sampler, steps=args.steps,
                            parameterization=model.parameterization)
            stub_times.append(clock() - start)

    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "alloc"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"
    median = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    return {"model": args.worker, "description": description, "params": params, "size": size, "latent": latent,
            "steps": n_steps, "text": median("text"), "loop": median("loop"), "decode": median("decode"),
            "total": median("total"), "model_step": statistics.median(model_times),
            "stub_step": statistics.median(stub_times) / n_steps, "peak": peak, "peak_kind": peak_kind,
            "finite": all(run["finite"] for run in runs)}


# -- driver: one fresh process per model, then the table --------------------------------------------

def row_cells(r: dict) -> list[str]:
    overhead = 100 * r["stub_step"] / r["model_step"]
    return [r["model"], f"{r['size']}x{r['size']}", str(r["steps"]), f"{r['text']:.3f}", f"{r['loop']:.2f}",
            f"{r['model_step']:.4f}", f"{1 / r['model_step']:.2f}", f"{overhead:.2g}% ({r['stub_step'] * 1e3:.2f} ms)", f"{r['decode']:.3f}",
            f"{r['total']:.2f}", f"{r['peak'] / 1024 ** 3:.2f} GiB {r['peak_kind']}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="default,sd1", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (as ldm.samplers.sample takes them)")
    parser.add_argument("--sampler", default="ddim", help="sampler, as txt2img --sampler (default ddim)")
    parser.add_argument("--size", type=int, default=512, help="sd1 image size in pixels (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per model")
    parser.add_argument("--channels-last", action="store_true", help="model.to(memory_format=torch.channels_last)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (the warm-up compiles)")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # a child process: measure one model, print its numbers as JSON on the last line
        print(json.dumps(run_worker(args)))
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.repeats < 1 or args.size < 8 or args.size % 8:
        parser.error("--steps and --repeats must be >= 1; --size a positive multiple of 8")
    import torch
    resolve_device_dtype(parser, args)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    rows, notes = [], []
    for name in models:
        command = [sys.executable, __file__, "--worker", name, "--device", args.device, "--dtype", args.dtype,
                   "--steps", str(args.steps), "--size", str(args.size), "--repeats", str(args.repeats),
                   "--sampler", args.sampler]
        command += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # progress goes to stderr, live
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode} (see above)"
            print(f"[{name}] failed: {why}", flush=True)
            notes.append(f"{name}: failed, {why}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        residual = (r["loop"] - r["steps"] * r["model_step"]) / r["steps"]
        notes.append(f"{name}: {r['description']}, {r['params'] / 1e6:.0f}M parameters, latent {r['latent']}x{r['latent']}; "
                     f"residual (loop - steps x model s/step) / steps = {residual * 1e3:.2f} ms "
                     f"({100 * residual / r['model_step']:.2f}% of model s/step)"
                     + ("" if r["finite"] else "; the decoded image was not finite"))
        print(f"[{name}] {notes[-1].split(': ', 1)[1]}", flush=True)

    header = ["model", "size", "steps", "text enc s", "loop s", "model s/step", "it/s", "sampler overhead %",
              "VAE decode s", "s/image", "peak mem"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    print()
    print(table)
    print(f"\n{elapsed:.0f} s")
    if not args.out or not rows:
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    command = "python bench/txt2img.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    options = " channels_last" * args.channels_last + " compile" * args.compile
    text = f"""## Text-to-image time per image: {', '.join(r['model'] for r in rows)}, {args.dtype} on {device}{options}, {args.sampler} {args.steps} steps

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device},
dtype {args.dtype}{" (CPU: the denoiser's weights; sampler, text encoder and VAE in fp32)" if args.dtype == "bf16" and args.device == "cpu" else ""}. Sampler {args.sampler} (DDIM: eta 0), CFG {GUIDANCE_SCALE} (denoiser batch 2), 1 image, prompt "{PROMPT}".
Median of {args.repeats} timed passes after a 2-step warm-up pass. Model s/step: median of lone denoiser calls.
Sampler overhead: the DDIM loop with a stub denoiser, per step, as % of model s/step (ms per step in brackets).
Peak mem: {"max_memory_allocated (weights included)" if args.device == "cuda" else "peak RSS of a fresh process per model"}.
Total run time {elapsed:.0f} s.

{table}

""" + "\n".join(f"- {note}" for note in notes) + "\n"
    sampler = "" if args.sampler == "ddim" and args.steps == 50 else f" {args.sampler} {args.steps}"
    write_section(f"txt2img {','.join(r['model'] for r in rows)} {args.device} {args.dtype}{options}{sampler}", text,
                  args.out)


if __name__ == "__main__":
    main()
