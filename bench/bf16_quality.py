#!/usr/bin/env python
"""bf16 on the CPU against fp32: image differences from the same seeds, caption retrieval, time per image.

    python bench/bf16_quality.py                               # default model + SD-v1 layout (random weights)
    python bench/bf16_quality.py --data 'data/emoji-shards/{000000..000007}.tar'   # + caption retrieval

bf16 here is what `txt2img.py --precision bf16` does on a CPU (`ldm.cli.cast_for_cpu_bf16`): the denoiser's
weights in bf16; the sampler, the text encoder and the VAE in fp32. For each model, the same prompts and seeds
run in fp32 and in bf16, alternating, and the decoded 8-bit images are compared: PSNR (dB, over each image),
the largest pixel difference (of 255) and the mean one.

- `default`: the embedded default model (32x32), `--prompts` prompts x 2 seeds, DDIM 50 steps, guidance 5;
  with `--data` (the emoji shards), caption retrieval top-1 at guidance 5 in both precisions
  (`tools/eval_text_to_image.py`'s measure: 50 captions x 2 seeds).
- `sd1`: the SD-v1 layout (860M UNet, CLIP ViT-L, kl-f8 VAE) with random weights (zero-initialised output
  convs refilled, as bench/txt2img.py builds it), 256x256 px, 2 seeds, DPM++ 2M Karras 10 steps, guidance 7.5:
  random weights draw no picture, but the comparison measures what bf16 does to the same arithmetic.
Writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from machine import RESULTS, machine, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = ["red apple", "grinning face", "red heart", "flag: Japan", "pizza", "dog face", "sun", "thumbs up",
           "ghost", "rocket", "birthday cake", "cat face", "fire", "rainbow", "banana", "snowman"]


def compare(a: list, b: list) -> dict:
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(1)
    psnr = 10 * np.log10(255 ** 2 / np.maximum(mse, 1e-12))
    return {"psnr_min": float(psnr.min()), "psnr_median": float(np.median(psnr)),
            "max_diff": float(np.abs(x - y).max()), "mean_diff": float(np.abs(x - y).mean())}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_model(name: str, fp32, bf16, prompts: list[str], *, steps: int, sampler: str, scale: float,
              size: int | None) -> dict:
    kwargs = dict(steps=steps, sampler=sampler, guidance_scale=scale, seed=0, n_samples=2, batch_size=1)
    if size:
        kwargs.update(height=size, width=size)
    times = {"fp32": [], "bf16": []}
    images = {}
    for precision, model in (("fp32", fp32), ("bf16", bf16), ("fp32", fp32), ("bf16", bf16)):  # alternating
        out, seconds = timed(lambda: model.generate(prompts, **kwargs))
        times[precision].append(seconds / len(out))
        images[precision] = out
        print(f"[{name}] {precision}: {seconds / len(out):.2f} s per image", flush=True)
    row = compare(images["fp32"], images["bf16"])
    row.update(model=name, images=len(images["fp32"]), steps=steps, sampler=sampler, scale=scale,
               fp32_s=min(times["fp32"]), bf16_s=min(times["bf16"]))
    return row


def retrieval(fp32, bf16, data: str) -> dict:
    spec = importlib.util.spec_from_file_location("eval_t2i", HERE.parent / "tools" / "eval_text_to_image.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from ldm.pipeline import native_size
    train_images, train_captions = tool.load_training_set(data, native_size(fp32))
    result = {}
    for precision, model in (("fp32", fp32), ("bf16", bf16)):
        r = tool.evaluate(model, train_images, train_captions, captions=50, seeds=2, scales=[5.0], steps=50,
                          sampler="ddim", feature_size=8, seed=0)
        result[precision] = r["rows"][0]
        print(f"[retrieval] {precision}: {r['rows'][0]['hits']}/{r['rows'][0]['images']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "sd1"], choices=["default", "sd1"])
    parser.add_argument("--prompts", type=int, default=16, help="default model: prompts (2 seeds each)")
    parser.add_argument("--data", default=None, help="the emoji shards, for caption retrieval (optional)")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    args = parser.parse_args()
    import torch

    import ldm
    from common.hardware import cpu_has_native_bf16
    from ldm.cli import cast_for_cpu_bf16
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows, found = [], None
    for name in args.models:
        if name == "default":
            fp32 = ldm.load_model()
            prompts, settings = (PROMPTS * 4)[:args.prompts], dict(steps=50, sampler="ddim", scale=5.0, size=None)
        else:
            sys.path.insert(0, str(HERE))
            from txt2img import build_sd1  # bench/txt2img.py: SD-v1 with random weights
            torch.manual_seed(0)
            fp32 = build_sd1()[0].eval()
            prompts, settings = ["a photo of a cat"], dict(steps=10, sampler="dpmpp_2m_karras", scale=7.5, size=256)
        bf16 = copy.deepcopy(fp32)
        cast_for_cpu_bf16(bf16)
        with torch.inference_mode():
            rows.append(run_model(name, fp32, bf16, prompts, **settings))
        if name == "default" and args.data:
            found = retrieval(fp32, bf16, args.data)
        del fp32, bf16
    elapsed = time.perf_counter() - started
    lines = ["| model | images | sampler, steps, CFG | PSNR min / median (dB) | max / mean pixel diff (of 255) "
             "| fp32 s/image | bf16 s/image | bf16 / fp32 time |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['images']} | {r['sampler']}, {r['steps']}, {r['scale']} | "
                     f"{r['psnr_min']:.1f} / {r['psnr_median']:.1f} | {r['max_diff']:.0f} / {r['mean_diff']:.2f} | "
                     f"{r['fp32_s']:.2f} | {r['bf16_s']:.2f} | {r['bf16_s'] / r['fp32_s']:.2f} |")
    if found:
        lines += ["", "| default model, guidance 5, DDIM 50 | caption retrieval top-1 |", "| --- | ---: |"]
        lines += [f"| {p} | {found[p]['retrieval']:.1%} ({found[p]['hits']}/{found[p]['images']}) |" for p in found]
    table = "\n".join(lines)
    print(table)
    if not args.out:
        return
    text = f"""## bf16 on the CPU: quality and time against fp32

`python bench/bf16_quality.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start; native bf16: {cpu_has_native_bf16()}.
python {platform.python_version()}, torch {torch.__version__}. bf16 = the denoiser's weights in bf16 (sampler, text
encoder, VAE in fp32), as `txt2img.py --precision bf16` on a CPU. Same prompts and seeds in both; times: the faster
of two alternating passes, per image (batch 1). Total run time {elapsed:.0f} s.

{table}
"""
    write_section("bf16_quality", text, args.out)


if __name__ == "__main__":
    main()
