#!/usr/bin/env python
"""Measure a text-to-image model against its captioned training set: does it draw what the prompt says,
does guidance help, and does it copy?

    python tools/eval_text_to_image.py --data 'data/emoji-shards/{000000..000007}.tar'          # the default model
    python tools/eval_text_to_image.py --ckpt runs/emoji-ldm/model.safetensors --data ... --scales 1 3 5
    python tools/eval_text_to_image.py --data ... --grid docs/default-model-grid.png        # + a labelled grid

Caption retrieval: `--captions` distinct training captions (seeded choice), `--seeds` images each. Every generated
image is matched to its nearest training image by a fixed feature (the image downsampled to `--feature-size`
pixels, RGB in [0, 1], Euclidean distance); a hit is a nearest image whose caption is the prompt. Chance is the
hit rate of a model that ignores the prompt: the share of training images carrying the prompt's caption, averaged
over the prompts. One row per guidance scale: the rate must rise from scale 1 (no guidance) to scale 5.

Copying: the mean root-mean-square pixel distance (full resolution, [0, 1]) from each generated image to its
nearest training image, next to the same figure for held-out training images against the rest of the set
(`--data` minus the image itself): a memorizing model would sit far below that reference.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

import ldm
from common.errors import InputError
from ldm.cli import HelpFormatter, check_output_file, require_counts, run_cli

if TYPE_CHECKING:  # torch, the model stack and webdataset load in the functions: --help answers without them
    import torch

GRID_PROMPTS = ["red apple", "grinning face", "red heart", "flag: Japan", "pizza", "dog face", "sun", "thumbs up",
                "ghost", "rocket", "birthday cake", "cat face", "fire", "rainbow", "banana", "snowman"]


def load_training_set(data: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """All images of the shards at `size` (center crop, no flip, as the model saw them) in [0, 1], and captions."""
    import torch

    from ldm.data.captions import WebDatasetCaptions

    stream = WebDatasetCaptions(data, size, caption_dropout=0.0, random_crop=False, random_flip=False,
                                shuffle_buffer=0, resampled=False)
    images, captions = [], []
    for sample in stream:
        images.append((sample["image"] + 1) / 2)
        captions.append(sample["caption"])
    if not images:
        raise InputError(f"no captioned images in {data}; give the model's training shards")
    return torch.stack(images), captions


def features(images: torch.Tensor, size: int) -> torch.Tensor:
    """The fixed retrieval feature: area-downsampled RGB pixels, flattened."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def nearest(query: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and Euclidean distance of each query row's nearest bank row, skipping bank row `exclude[i]` for
    query row i when given (a training image against the rest of the set); chunked to bound memory."""
    import torch

    indices, distances = [], []
    for start in range(0, len(query), 256):
        d = torch.cdist(query[start:start + 256], bank)
        if exclude is not None:
            d[torch.arange(len(d)), exclude[start:start + len(d)]] = float("inf")
        dist, idx = d.min(dim=1)
        indices.append(idx)
        distances.append(dist)
    return torch.cat(indices), torch.cat(distances)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).mean(1).sqrt()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])).permute(0, 3, 1, 2)


def evaluate(model, train_images: torch.Tensor, train_captions: list[str], *, captions: int, seeds: int,
             scales: list[float], steps: int, sampler: str, feature_size: int, seed: int) -> dict:
    import torch

    distinct = sorted(set(c for c in train_captions if c))
    if captions > len(distinct):
        raise InputError(f"--captions {captions} but the training set has only {len(distinct)} distinct captions")
    prompts = random.Random(seed).sample(distinct, captions)
    counts = {c: train_captions.count(c) for c in prompts}
    chance = float(np.mean([counts[c] / len(train_captions) for c in prompts]))
    bank = features(train_images, feature_size)
    rows = []
    for scale in scales:
        start = time.perf_counter()
        images = model.generate(prompts, n_samples=seeds, seed=seed, steps=steps, sampler=sampler,
                                guidance_scale=scale, batch_size=50)
        seconds = time.perf_counter() - start
        generated = to_tensor(images)
        idx, _ = nearest(features(generated, feature_size), bank)
        wanted = [p for p in prompts for _ in range(seeds)]
        hits = [train_captions[i] == want for i, want in zip(idx.tolist(), wanted)]
        copy_distance = rms_distance(generated, train_images[idx])
        rows.append({"scale": scale, "retrieval": float(np.mean(hits)), "hits": int(sum(hits)), "images": len(hits),
                     "nearest_rms": float(copy_distance.mean()), "nearest_rms_min": float(copy_distance.min()),
                     "seconds_per_image": seconds / len(images)})
    # Reference for "not a copy": each of up to 500 training images against the rest of the set.
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:500]
    other, _ = nearest(features(train_images[pick], feature_size), bank, exclude=pick)
    reference = float(rms_distance(train_images[pick], train_images[other]).mean())
    return {"prompts": prompts, "chance": chance, "rows": rows, "train_nearest_rms": reference,
            "train_images": len(train_captions), "distinct_captions": len(distinct)}


def labelled_grid(model, prompts: list[str], *, seed: int, steps: int, sampler: str, scale: float,
                  cell: int = 128, columns: int = 4) -> Image.Image:
    """One image per prompt (seed, seed+1, ...), upscaled to `cell` pixels, the prompt written under each."""
    images = [model.generate(p, seed=seed + k, steps=steps, sampler=sampler, guidance_scale=scale)[0]
              for k, p in enumerate(prompts)]
    label = 18
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (k % columns) * cell, (k // columns) * (cell + label)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 4, y + cell + 3), prompt, fill="black")
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=None, help="model file; default: the embedded default model")
    p.add_argument("--data", required=True, help="the model's training shards (captioned images)")
    p.add_argument("--captions", type=int, default=50, help="distinct training captions to prompt with")
    p.add_argument("--seeds", type=int, default=4, help="images per caption")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 5.0], help="guidance scales to compare")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", help="sampler (as txt2img --sampler)")
    p.add_argument("--feature-size", type=int, default=8, help="retrieval feature: pixels per side after pooling")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption choice and of the first image")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--grid", default=None, help="write a labelled grid of --grid-prompts here (PNG)")
    p.add_argument("--grid-prompts", nargs="+", default=GRID_PROMPTS,
                   help="the prompts of the --grid (default: 16 emoji names, from \"red apple\" to \"snowman\")")
    p.add_argument("--grid-scale", type=float, default=5.0, help="guidance scale of the --grid")
    args = p.parse_args()
    require_counts(args, 'captions', 'seeds', 'steps', 'feature_size')
    for flag, path, what in (("--json", args.json, "the results"), ("--grid", args.grid, "the grid")):
        if path:
            check_output_file(path, flag, what=what)
    # torch, the model stack and webdataset load only now: --help and bad flags answer without them
    import torch

    from ldm.pipeline import native_size

    torch.set_grad_enabled(False)
    model = ldm.load_model(args.ckpt).eval()
    size = native_size(model)
    train_images, train_captions = load_training_set(args.data, size)
    result = evaluate(model, train_images, train_captions, captions=args.captions, seeds=args.seeds,
                      scales=args.scales, steps=args.steps, sampler=args.sampler, feature_size=args.feature_size,
                      seed=args.seed)
    print(f"{result['train_images']} training images, {result['distinct_captions']} distinct captions; "
          f"{args.captions} captions x {args.seeds} seeds, {args.sampler} {args.steps} steps, "
          f"feature {args.feature_size}x{args.feature_size} RGB")
    print("| guidance scale | caption retrieval (top-1) | chance | x chance | RMS to nearest training image | s/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['scale']:g} | {row['retrieval']:.1%} ({row['hits']}/{row['images']}) | {result['chance']:.3%} "
              f"| {row['retrieval'] / result['chance']:.0f} | {row['nearest_rms']:.3f} (min {row['nearest_rms_min']:.3f}) "
              f"| {row['seconds_per_image']:.3f} |")
    print(f"reference: a training image to its nearest other training image, RMS {result['train_nearest_rms']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        labelled_grid(model, args.grid_prompts, seed=args.seed, steps=args.steps, sampler=args.sampler,
                      scale=args.grid_scale).save(args.grid)
        print(f"grid of {len(args.grid_prompts)} prompts (scale {args.grid_scale:g}) in {args.grid}")


if __name__ == "__main__":
    run_cli(main)
