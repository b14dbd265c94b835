#!/usr/bin/env python
"""Step caching (DeepCache, `ldm.denoisers.deep_cache`): its speed-up and its quality cost.

    python bench/deep_cache.py --threads 1              # 50 captions x 2 seeds; SD-v1 step; ~7 min on busy cores
    python bench/deep_cache.py --seeds 4                # the README's 200 images per configuration (twice the time)
    python bench/deep_cache.py --captions 8 --seeds 1 --sd1-repeats 1 --out ''   # quick check; print only

1. The embedded default model (`ldm.load_model()`), guidance `--scale` (5, as the README's retrieval figure),
   for each sampler configuration (DDIM 50 steps, DPM++ 2M Karras 20 steps) and each `--intervals` value
   (1 = off, 2, 3, 5; branch `--branch`, default 0: the input conv and the last output block). The prompts
   are `--captions` distinct training captions chosen as tools/eval_text_to_image.py chooses them (same
   seed), `--seeds` images each, image k of the run with seed `--seed` + k, so every configuration draws
   the same images from the same noise. The prompts go in chunks of `--chunk` captions; each chunk runs
   every configuration in turn (the order rotated from chunk to chunk), so a change in the machine's load
   hits all of them alike. Per configuration:
   - s/image: wall time of `generate` (text encoding, sampling, decoding) over the images; speed-up against
     the same sampler with the cache off;
   - caption retrieval top-1 (with the training shards, `--data`, default data/emoji-shards/ when present):
     a hit is a generated image whose nearest training image (8x8 RGB, Euclidean) carries the prompt's
     caption, as tools/eval_text_to_image.py counts it; `changed` counts images whose hit / miss differs
     from the same image with the cache off (+ gained, - lost);
   - image difference against the same sampler with the cache off, same seeds: mean absolute pixel
     difference (0-255) and PSNR (dB, mean over images; identical images count as 100 dB). For scale, the
     same two figures between the two samplers with the cache off (how far a change of sampler moves the
     images) are printed under the table.
2. The SD-v1 UNet (`ldm.formats.original_configs.SD_V1`'s unet_config, random weights as
   bench/unet_step.py builds them), latent 32x32, batch 2 (guidance), context (2, 77, 768): one full step
   against one shallow step per `--sd1-branches` value (median of `--sd1-repeats`, calls alternating),
   timing only, and the speed-up of a whole run that this implies: interval x full / (full + (interval - 1)
   x shallow).

Writes its section of bench/RESULTS.md (`--out`). The decision rule it applies: the cache may be on by
default only where its cost is negligible, i.e. no cached configuration loses more than `--negligible-points`
(1) points of retrieval (or, without the shards, keeps a PSNR of at least 40 dB against the uncached images).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from machine import RESULTS, machine, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

DEFAULT_DATA = "data/emoji-shards/{000000..000007}.tar"
SAMPLERS = {"DDIM 50": ("ddim", 50), "DPM++ 2M Karras 20": ("dpmpp_2m_karras", 20)}
PSNR_IDENTICAL = 100.0


def have_shards(data: str) -> bool:
    """Whether the folder of the shard pattern `data` holds .tar files."""
    return bool(data) and any(Path(data).parent.glob("*.tar"))


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images (peak 255); PSNR_IDENTICAL where they are equal."""
    import numpy as np
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def compare(images, reference) -> tuple[float, float]:
    """(mean absolute pixel difference 0-255, mean PSNR dB) of two lists of PIL images."""
    import numpy as np
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(images, reference)]
    mad = float(np.mean([np.abs(a.astype(np.float64) - b).mean() for a, b in pairs]))
    return mad, float(np.mean([psnr(a, b) for a, b in pairs]))


def default_model_runs(args) -> dict:
    """Generate every (sampler, interval) configuration, alternating by chunk; times, images and retrieval."""
    import torch
    from eval_text_to_image import GRID_PROMPTS, features, load_training_set, nearest, to_tensor

    import ldm
    from ldm.denoisers.deep_cache import disable_deep_cache, enable_deep_cache
    from ldm.pipeline import native_size

    torch.set_grad_enabled(False)
    model = ldm.load_model().eval()
    data = args.data if have_shards(args.data) else ""
    have_data = bool(data)
    train_images = train_captions = bank = None
    if have_data:
        start = time.perf_counter()
        train_images, train_captions = load_training_set(data, native_size(model))
        bank = features(train_images, 8)
        print(f"training set: {len(train_captions)} images from {data} ({time.perf_counter() - start:.0f} s)")
        distinct = sorted(set(c for c in train_captions if c))
        prompts = random.Random(args.seed).sample(distinct, args.captions)  # as eval_text_to_image.evaluate
    else:
        print(f"no training shards at {args.data!r}: image differences only, on the {len(GRID_PROMPTS)} grid prompts")
        prompts = GRID_PROMPTS[:args.captions]
    configs = [(name, interval) for name in args.samplers for interval in args.intervals]
    seconds = {c: 0.0 for c in configs}
    images = {c: [] for c in configs}
    chunks = [prompts[i:i + args.chunk] for i in range(0, len(prompts), args.chunk)]
    model.generate(prompts[:1], seed=args.seed, steps=2, guidance_scale=args.scale)  # warm-up
    for k, chunk in enumerate(chunks):
        first = args.seed + k * args.chunk * args.seeds  # image k of the whole run keeps seed + k
        order = configs[k % len(configs):] + configs[:k % len(configs)]
        for name, interval in order:
            sampler, steps = SAMPLERS[name]
            if interval > 1:  # 1: off, the plain UNet (the wrapper at interval 1 gives the same bits)
                enable_deep_cache(model, interval, args.branch)
            start = time.perf_counter()
            out = model.generate(chunk, n_samples=args.seeds, seed=first, steps=steps, sampler=sampler,
                                 guidance_scale=args.scale, batch_size=len(chunk) * args.seeds)
            seconds[name, interval] += time.perf_counter() - start
            images[name, interval].extend(out)
            disable_deep_cache(model)
        print(f"chunk {k + 1}/{len(chunks)} done")
    wanted = [p for p in prompts for _ in range(args.seeds)]
    hits = {}
    if have_data:
        for config in configs:
            idx, _ = nearest(features(to_tensor(images[config]), 8), bank)
            hits[config] = [train_captions[i] == want for i, want in zip(idx.tolist(), wanted)]
    unet, batch = model.denoiser, 2 * args.chunk * args.seeds  # guidance: [uncond, cond]
    latent = model.config.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.config.autoencoder.embed_dim, latent, latent, generator=gen)
    context = model.text_encoder.encode(["red apple"] * batch)
    ms = step_ms(unet, x, torch.full((batch,), 500), context, [args.branch], args.step_repeats)
    blocks = (len(unet.input_blocks), len(unet.output_blocks))
    del model, unet
    gc.collect()
    return {"configs": configs, "seconds": seconds, "images": images, "hits": hits, "n_images": len(wanted),
            "have_data": have_data, "prompts": len(prompts), "ms": ms, "batch": batch, "blocks": blocks}


def step_ms(unet, x, t, context, branches: list[int], repeats: int) -> dict:
    """Median ms of one full UNet call and of one shallow call per branch, the calls alternating."""
    import torch

    from ldm.denoisers.deep_cache import DeepCacheUNet

    wrappers = {b: DeepCacheUNet(unet, interval=10 ** 6, branch=b) for b in branches}  # shallow after the first
    times = {"full": []} | {b: [] for b in branches}
    with torch.inference_mode():
        for wrapper in wrappers.values():
            wrapper(x, t, context)  # the full pass that fills this branch's cache (and warms up)
        for _ in range(repeats):
            for key in times:
                start = time.perf_counter()
                unet(x, t, context) if key == "full" else wrappers[key](x, t, context)
                times[key].append((time.perf_counter() - start) * 1e3)
    assert all(w.shallow_passes == repeats for w in wrappers.values())
    return {key: statistics.median(values) for key, values in times.items()}


def sd1_steps(args) -> dict:
    """The SD-v1 UNet (random weights), batch 2 at `--sd1-size` latents: `step_ms` per `--sd1-branches`."""
    import torch

    from ldm.denoisers.unet import UNetConfig, UNetModel
    from ldm.formats.original_configs import SD_V1

    params = dict(SD_V1["model"]["params"]["unet_config"]["params"], use_checkpoint=False)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.from_original(params)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the original init zeroes the output conv; refill it, as bench/unet_step.py does
        for p in unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() if p.ndim > 1 else p.numel()) ** 0.5)
    x = torch.randn(2, 4, args.sd1_size, args.sd1_size, generator=gen)
    t, context = torch.tensor([500, 500]), torch.randn(2, 77, 768, generator=gen)
    ms = step_ms(unet, x, t, context, args.sd1_branches, args.sd1_repeats)
    return {"ms": ms, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "blocks": (len(unet.input_blocks), len(unet.output_blocks))}


def step_table(title: str, ms: dict, blocks: tuple[int, int], intervals: list[int]) -> list[str]:
    """Markdown: full and shallow step times, and the speed-up they imply for a whole run at each interval:
    interval x full / (full + (interval - 1) x shallow), the UNet alone (text encoder, sampler and decoder left out)."""
    full, cached = ms["full"], [i for i in intervals if i > 1]
    lines = [f"{title}; implied speed-up of the UNet over a run = interval x full / (full + (interval - 1) x shallow):",
             "", "| step | input blocks | output blocks | ms | share of full | implied speed-up at interval "
             + ", ".join(map(str, cached)) + " |", "|---|---:|---:|---:|---:|---|",
             f"| full | {blocks[0]} | {blocks[1]} (+ middle) | {full:.1f} | 100% | - |"]
    for branch, shallow in ((k, v) for k, v in ms.items() if k != "full"):
        implied = ", ".join(f"{i * full / (full + (i - 1) * shallow):.2f}x" for i in cached)
        lines.append(f"| shallow, branch {branch} | {branch + 1} | {branch + 1} | {shallow:.1f} | {shallow / full:.0%} "
                     f"| {implied} |")
    return lines


def report(args, runs: dict, sd1: dict | None, started: float) -> str:
    configs, n = runs["configs"], runs["n_images"]
    lines = ["| sampler | interval | s/image | speed-up | retrieval top-1 | changed vs off | "
             "mean abs diff (0-255) | PSNR vs off (dB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    worst_drop, worst_psnr = 0.0, PSNR_IDENTICAL
    for name, interval in configs:
        off = (name, 1) if (name, 1) in runs["seconds"] else None
        per_image = runs["seconds"][name, interval] / n
        speed = "" if off is None else f"{runs['seconds'][off] / runs['seconds'][name, interval]:.2f}x"
        if runs["have_data"]:
            hits = runs["hits"][name, interval]
            retrieval = f"{sum(hits) / n:.1%} ({sum(hits)}/{n})"
            if off is not None and interval != 1:
                base = runs["hits"][off]
                gained = sum(h and not b for h, b in zip(hits, base))
                lost = sum(b and not h for h, b in zip(hits, base))
                changed = f"+{gained} / -{lost}"
                worst_drop = max(worst_drop, 100 * (sum(base) - sum(hits)) / n)
            else:
                changed = "-"
        else:
            retrieval, changed = "(no data)", "-"
        if off is not None and interval != 1:
            mad, db = compare(runs["images"][name, interval], runs["images"][off])
            worst_psnr = min(worst_psnr, db)
            diff = f"{mad:.2f}", f"{db:.1f}"
        else:
            diff = "-", "-"
        lines.append(f"| {name} | {interval}{' (off)' if interval == 1 else ''} | {per_image:.3f} | {speed or '-'} | "
                     f"{retrieval} | {changed} | {diff[0]} | {diff[1]} |")
    notes = []
    names = list(dict.fromkeys(name for name, _ in configs))
    if len(names) >= 2 and all((name, 1) in runs["images"] for name in names[:2]):
        mad, db = compare(runs["images"][names[1], 1], runs["images"][names[0], 1])
        notes.append(f"For scale: {names[1]} against {names[0]}, both uncached, same seeds: mean abs diff {mad:.2f}, "
                     f"PSNR {db:.1f} dB.")
    if runs["have_data"]:
        negligible = worst_drop <= args.negligible_points
        notes.append(f"Largest retrieval loss of a cached configuration against the same sampler uncached: "
                     f"{worst_drop:.1f} points (negligible: at most {args.negligible_points:g}); lowest PSNR "
                     f"{worst_psnr:.1f} dB.")
    else:
        negligible = worst_psnr >= 40
        notes.append(f"Lowest PSNR of a cached configuration against the uncached images: {worst_psnr:.1f} dB "
                     "(negligible: at least 40 dB).")
    notes.append(f"Decision by the rule of bench/README.md: the cost is {'negligible' if negligible else 'not negligible'}"
                 f", so the deep cache is {'on' if negligible else 'off'} by default "
                 f"({'' if negligible else 'an option: '}`enable_deep_cache(model, interval)`).")
    default_steps = step_table(f"Default model UNet, batch {runs['batch']} (one generate call of the runs above, "
                               f"with guidance), median of {args.step_repeats}", runs["ms"], runs["blocks"],
                               args.intervals)
    sd1_lines = [] if sd1 is None else step_table(
        f"SD-v1 UNet ({sd1['params_m']:.0f}M parameters, random weights), latent {args.sd1_size}x{args.sd1_size}, "
        f"batch 2, median of {args.sd1_repeats}", sd1["ms"], sd1["blocks"], args.intervals)
    import torch
    command = "python bench/deep_cache.py" + "".join(
        f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out" and v != PARSER_DEFAULTS[k])
    head = [
        "## Step caching (DeepCache): speed and quality on the default model, and the SD-v1 step", "",
        f"- command: `{command}`, {time.perf_counter() - started:.0f} s",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- default model: {runs['prompts']} prompts x {args.seeds} seeds = {n} images per configuration, guidance "
        f"{args.scale:g}, branch {args.branch}, chunks of {args.chunk} prompts, configurations alternating; "
        + ("prompts: training captions chosen as tools/eval_text_to_image.py does (seed "
           f"{args.seed}), retrieval against {args.data}" if runs["have_data"] else
           "no training shards: grid prompts, image differences only"), ""]
    return "\n".join(head + lines + [""] + notes + [""] + default_steps + ([""] + sd1_lines if sd1_lines else []) + [""])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="the default model's training shards ('' = none)")
    p.add_argument("--captions", type=int, default=50, help="distinct training captions to prompt with")
    p.add_argument("--seeds", type=int, default=2, help="images per caption")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption choice and of the first image")
    p.add_argument("--scale", type=float, default=5.0, help="guidance scale")
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5], help="cache intervals (1 = off)")
    p.add_argument("--branch", type=int, default=0, help="cache branch of the default model's UNet")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS), help="configurations")
    p.add_argument("--chunk", type=int, default=10, help="prompts per generate call (x seeds images)")
    p.add_argument("--negligible-points", type=float, default=1.0,
                   help="largest retrieval loss (percentage points) that counts as negligible")
    p.add_argument("--step-repeats", type=int, default=10, help="timed default-model UNet calls of each kind")
    p.add_argument("--sd1-size", type=int, default=32, help="SD-v1 latent side")
    p.add_argument("--sd1-branches", type=int, nargs="+", default=[0, 2], help="SD-v1 cache branches to time")
    p.add_argument("--sd1-repeats", type=int, default=3, help="timed SD-v1 steps of each kind")
    p.add_argument("--skip-sd1", action="store_true", help="leave out the SD-v1 step timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    return p


PARSER_DEFAULTS = vars(build_parser().parse_args([]))


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if min(args.captions, args.seeds, args.chunk, args.sd1_repeats, *args.intervals) < 1:
        parser.error("--captions, --seeds, --chunk, --sd1-repeats and --intervals must be >= 1")
    if 1 not in args.intervals:
        parser.error("--intervals must include 1 (off): every figure is against it")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = default_model_runs(args)
    sd1 = None if args.skip_sd1 else sd1_steps(args)
    text = report(args, runs, sd1, started)
    print(text)
    if args.out:
        write_section("deep_cache cpu", text, args.out)


if __name__ == "__main__":
    main()
