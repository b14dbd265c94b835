#!/usr/bin/env python
"""Precompute autoencoder latents (and text contexts) of image-caption shards, for faster training.

    python tools/encode_latents.py --config configs/ldm/tiny.yaml --data 'shards/{000000..000009}.tar' \\
        --out 'latents/%06d.tar' model.autoencoder_ckpt=runs/ae/autoencoder.safetensors
    python tools/train_ldm.py --config configs/ldm/tiny.yaml --latents 'latents/{000000..000009}.tar' --out runs/ldm \\
        model.autoencoder_ckpt=runs/ae/autoencoder.safetensors

Each sample keeps its key and caption and gets `mean.npy` and `std.npy` (the posterior q(z|x), so
training still draws a fresh z = mean + std * eps each time), `autoencoder.json` (the fingerprint of the
autoencoder's weights, its scale_factor and checkpoint: train_ldm.py --latents refuses a model with another
autoencoder) and, when the text encoder is frozen, `ctx.npy` (the caption's context; for an SDXL-style
conditioner also `pooled.npy`, the pooled text embedding: y is built at training time from it and the sizes).
With the config's train.buckets (or an SDXL-style conditioner) each image is fitted to its aspect-ratio bucket
as train_ldm.py would (ldm/data/buckets.py; centred crop), encoded at that shape, and `micro.json` records its
original size, crop and target size. Encoding once instead of every epoch is the main speed-up of public SD
training; the price is that crops and flips are fixed (center crop, no flip) here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import HelpFormatter, apply_overrides, check_output_folder, pick_device, require_counts, run_cli

if TYPE_CHECKING:  # torch, the model stack and webdataset load in the functions: --help answers without them
    import torch

    from ldm.model import LatentDiffusion


def build_model(config_path: str, overrides: list[str], device: torch.device) -> tuple[LatentDiffusion, dict]:
    """The model exactly as tools/train_ldm.py builds it (same config, same seed)."""
    import torch

    from ldm.formats.loading import model_from_training_config

    raw = apply_overrides(read_yaml(config_path), overrides)
    torch.manual_seed(int((raw.get("train") or {}).get("seed", 0)))
    model = model_from_training_config(raw.get("model") or {})
    return model.to(device).eval(), raw


def encode_batch(model: LatentDiffusion, images: torch.Tensor, captions: list[str] | None) -> dict[str, torch.Tensor]:
    """Posterior mean and std of each image; contexts of the captions when given (and a conditioner's pooled
    text embeddings)."""
    import torch

    from ldm.training.conditioning import is_conditioner, text_outputs

    with torch.no_grad():
        posterior = model.autoencoder.encode(images)
        out = {"mean": posterior.mean, "std": posterior.std}
        if captions is not None and is_conditioner(model.text_encoder):
            out["ctx"], out["pooled"] = text_outputs(model.text_encoder, captions, images.device)
        elif captions is not None:
            out["ctx"] = model.text_encoder.encode(captions)
    return out


def same_shape_groups(items: list[dict]) -> list[list[dict]]:
    """`items` in groups of one image shape (one bucket), each encoded as one batch; first-met order."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return list(groups.values())


def micro_record(item: dict) -> bytes:
    """micro.json: the sizes an SDXL-style model conditions on, (height, width) and (top, left) as sgm orders them."""
    return json.dumps({"original_size": list(item["original_size"]), "crop": list(item["crop"]),
                       "target_size": list(item["target_size"]), "aesthetic_score": item["aesthetic_score"]}).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="the training config (its model section)")
    p.add_argument("--data", required=True, help="image-caption shards")
    p.add_argument("--out", required=True, help="output shard pattern with %%d, e.g. 'latents/%%06d.tar'")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per output shard")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded at once")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage precision")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args()
    require_counts(args, 'shard_size', 'batch_size')
    if "%" not in args.out:
        raise InputError(f"--out {args.out!r} needs a %d field for the shard number, e.g. 'latents/%06d.tar'")
    check_output_folder(Path(args.out).parent, flag="--out", what="the latent shards")
    # torch, the model stack and webdataset load only now: --help and bad flags answer without them
    import numpy as np
    import torch
    import webdataset as wds
    from tqdm import tqdm

    from ldm.data.captions import AUTOENCODER_RECORD, WebDatasetCaptions, describe_autoencoder
    from ldm.formats.loading import autoencoder_record
    from ldm.training.batches import training_buckets
    from ldm.training.conditioning import is_conditioner
    from ldm.training.config import TrainConfig

    device = pick_device(args.device)
    model, raw = build_model(args.config, args.overrides, device)
    train = raw.get("train") or {}
    size = int(train.get("image_size", model.config.autoencoder.resolution))
    buckets = training_buckets(model, TrainConfig.from_dict({**train, "image_size": size}))
    contexts = not getattr(model.text_encoder, "trainable", False)
    record = autoencoder_record(model, raw.get("model") or {})
    dataset = WebDatasetCaptions(args.data, size, caption_dropout=0.0, random_crop=False, random_flip=False,
                                 shuffle_buffer=0, resampled=False, buckets=buckets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=lambda items: items)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if args.dtype == "float16" else np.float32
    count = 0
    with wds.ShardWriter(args.out, maxcount=args.shard_size, verbose=0) as sink:
        for loaded in tqdm(loader, desc="encoding", unit="batch"):
            for items in same_shape_groups(loaded):
                images = torch.stack([item["image"] for item in items]).to(device)
                captions = [item["caption"] for item in items]
                encoded = encode_batch(model, images, captions if contexts else None)
                for k, item in enumerate(items):
                    sample = {"__key__": item["key"], "txt": item["caption"],
                              AUTOENCODER_RECORD: json.dumps(record).encode()}
                    for name in ("mean", "std", "ctx", "pooled"):
                        if name in encoded:
                            sample[f"{name}.npy"] = encoded[name][k].cpu().numpy().astype(dtype)
                    if buckets is not None:
                        sample["micro.json"] = micro_record(item)
                    sink.write(sample)
                count += len(items)
    summary = {"samples": count, "contexts": contexts, "dtype": args.dtype, "skipped": dataset.skipped,
               "autoencoder": record, "buckets": None if buckets is None else [list(b) for b in buckets]}
    (Path(args.out).parent / "latents_summary.json").write_text(json.dumps(summary, indent=2))
    what = ("latents only: the text encoder trains" if not contexts else "latents, contexts and pooled text embeddings"
            if is_conditioner(model.text_encoder) else "latents and contexts")
    print(f"encoded {count} samples into {args.out} ({what}{', per bucket' if buckets and len(buckets) > 1 else ''}); "
          f"skipped {dataset.skipped}; autoencoder {describe_autoencoder(record)}")


if __name__ == "__main__":
    run_cli(main)
