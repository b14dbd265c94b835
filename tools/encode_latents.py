#!/usr/bin/env python
"""Precompute autoencoder latents (and text contexts) of image-caption shards, for faster training.

    python tools/encode_latents.py --config configs/ldm/tiny.yaml --data 'shards/{000000..000009}.tar' \\
        --out 'latents/%06d.tar' model.autoencoder_ckpt=runs/ae/autoencoder.safetensors
    python tools/train_ldm.py --config configs/ldm/tiny.yaml --latents 'latents/{000000..000009}.tar' --out runs/ldm \\
        model.autoencoder_ckpt=runs/ae/autoencoder.safetensors

Each sample keeps its key and caption and gets `mean.npy` and `std.npy` (the posterior q(z|x), so
training still draws a fresh z = mean + std * eps each time), `autoencoder.json` (the fingerprint of the
autoencoder's weights, its scale_factor and checkpoint: train_ldm.py --latents refuses a model with another
autoencoder) and, when the text encoder is frozen, `ctx.npy` (the caption's context). Encoding once instead
of every epoch is the main speed-up of public SD training; the price is that crops and flips are fixed
(center crop, no flip) here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import HelpFormatter, apply_overrides, pick_device, require_counts, run_cli
from ldm.data.captions import AUTOENCODER_RECORD, WebDatasetCaptions, describe_autoencoder
from ldm.formats.loading import autoencoder_record, model_from_training_config
from ldm.model import LatentDiffusion


def build_model(config_path: str, overrides: list[str], device: torch.device) -> tuple[LatentDiffusion, dict]:
    """The model exactly as tools/train_ldm.py builds it (same config, same seed)."""
    raw = apply_overrides(read_yaml(config_path), overrides)
    torch.manual_seed(int((raw.get("train") or {}).get("seed", 0)))
    model = model_from_training_config(raw.get("model") or {})
    return model.to(device).eval(), raw


@torch.no_grad()
def encode_batch(model: LatentDiffusion, images: torch.Tensor, captions: list[str] | None) -> dict[str, torch.Tensor]:
    """Posterior mean and std of each image; contexts of the captions when given."""
    posterior = model.autoencoder.encode(images)
    out = {"mean": posterior.mean, "std": posterior.std}
    if captions is not None:
        out["ctx"] = model.text_encoder.encode(captions)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="the training config (its model section)")
    p.add_argument("--data", required=True, help="image-caption shards")
    p.add_argument("--out", required=True, help="output shard pattern with %%d, e.g. 'latents/%%06d.tar'")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per output shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage precision")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args()
    require_counts(args, 'shard_size', 'batch_size')
    if "%" not in args.out:
        raise InputError(f"--out {args.out!r} needs a %d field for the shard number, e.g. 'latents/%06d.tar'")
    device = pick_device(args.device)
    model, raw = build_model(args.config, args.overrides, device)
    size = int((raw.get("train") or {}).get("image_size", model.config.autoencoder.resolution))
    contexts = not getattr(model.text_encoder, "trainable", False)
    record = autoencoder_record(model, raw.get("model") or {})
    dataset = WebDatasetCaptions(args.data, size, caption_dropout=0.0, random_crop=False, random_flip=False,
                                 shuffle_buffer=0, resampled=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=lambda items: items)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if args.dtype == "float16" else np.float32
    count = 0
    with wds.ShardWriter(args.out, maxcount=args.shard_size, verbose=0) as sink:
        for items in tqdm(loader, desc="encoding", unit="batch"):
            images = torch.stack([item["image"] for item in items]).to(device)
            captions = [item["caption"] for item in items]
            encoded = encode_batch(model, images, captions if contexts else None)
            for k, item in enumerate(items):
                sample = {"__key__": item["key"], "txt": item["caption"],
                          "mean.npy": encoded["mean"][k].cpu().numpy().astype(dtype),
                          "std.npy": encoded["std"][k].cpu().numpy().astype(dtype),
                          AUTOENCODER_RECORD: json.dumps(record).encode()}
                if contexts:
                    sample["ctx.npy"] = encoded["ctx"][k].cpu().numpy().astype(dtype)
                sink.write(sample)
            count += len(items)
    summary = {"samples": count, "contexts": contexts, "dtype": args.dtype, "skipped": dataset.skipped,
               "autoencoder": record}
    (Path(args.out).parent / "latents_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"encoded {count} samples into {args.out} ({'latents and contexts' if contexts else 'latents only: the text encoder trains'}); "
          f"skipped {dataset.skipped}; autoencoder {describe_autoencoder(record)}")


if __name__ == "__main__":
    run_cli(main)
