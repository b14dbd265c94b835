"""tools/train_ldm.py's data: image-caption or cached-latent shards -> endless training batches.

Without buckets and for a plain text encoder, batches are today's square crops (or cached latents of one
shape), batched by the DataLoader. With `train.buckets`, or for an SDXL-style conditioner (which needs each
sample's original size and crop even for square crops: one square bucket), the stream is batched per bucket
by `ldm.data.buckets.BucketBatches`, every batch of one shape.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ldm.data.buckets import Bucket, BucketBatches, collate_images, make_buckets, unbatched
from ldm.data.captions import WebDatasetCaptions, WebDatasetLatents, collate_latents
from ldm.data.images import endless_batches
from ldm.model import LatentDiffusion
from ldm.training.conditioning import is_conditioner, unconditional_text
from ldm.training.config import TrainConfig


def training_buckets(model: LatentDiffusion, cfg: TrainConfig) -> list[Bucket] | None:
    """The buckets images are fitted to: around `image_size` with `train.buckets`; one square bucket for an
    SDXL-style conditioner (so each sample records its crop); None for today's square crops."""
    if cfg.buckets:
        return make_buckets(cfg.image_size, multiple=model.size_multiple, max_ratio=cfg.bucket_max_ratio)
    if is_conditioner(model.text_encoder):
        return [(cfg.image_size, cfg.image_size)]
    return None


def unconditional_for_cache(model: LatentDiffusion, *, latents: bool, train_text: bool) -> dict[str, torch.Tensor]:
    """`collate_latents`' fillers for cached text of dropped captions: the frozen encoder's context of "" (a
    conditioner's zeros where `zero_uncond`, with its pooled embedding); nothing when the text is not cached."""
    if not latents or train_text:
        return {}
    with torch.no_grad():
        if is_conditioner(model.text_encoder):
            context, pooled = unconditional_text(model.text_encoder)
            return {"uncond_context": context, "uncond_pooled": pooled}
        return {"uncond_context": model.text_encoder.encode([""])[0].cpu()}


def training_batches(*, data: str | None, latents: str | None, cfg: TrainConfig, rank: int, step: int,
                     buckets: list[Bucket] | None, uncond: dict[str, torch.Tensor],
                     autoencoder: dict | None) -> tuple[Any, Iterator[dict[str, Any]]]:
    """(the dataset, for its skip count; endless batches {"image" | "mean","std","context"[,"pooled"], "caption",
    "key"[, "original_size", "crop", "target_size", "aesthetic_score"]}).

    Cached contexts of dropped captions are filled from `uncond` (`unconditional_for_cache`); cached latents must
    record `autoencoder` (`autoencoder_record`). With `buckets` (`training_buckets`), batches are of one bucket
    each. The first batch is read now: data with no usable sample (or another autoencoder's latents) stops the
    run before it starts, with one line."""
    seed = cfg.seed + 1000 * step  # a resumed run reshuffles rather than replaying the first batches
    stream = dict(caption_dropout=cfg.caption_dropout, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                  seed=seed)
    if latents:
        dataset = WebDatasetLatents(latents, autoencoder=autoencoder, **stream)
        collate, shape_of = functools.partial(collate_latents, **uncond), "mean"
    else:
        dataset = WebDatasetCaptions(data, cfg.image_size, random_crop=cfg.random_crop,
                                     random_flip=cfg.random_flip, buckets=buckets, **stream)
        collate, shape_of = (collate_images if buckets is not None else None), "image"
    generator = torch.Generator().manual_seed(seed + rank)
    if buckets is None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate,
                            generator=generator)
        return dataset, endless_batches(loader)
    batched = BucketBatches(dataset, cfg.batch_size, collate=collate, shape_of=shape_of)
    loader = DataLoader(batched, batch_size=None, num_workers=cfg.num_workers, collate_fn=unbatched,
                        generator=generator)
    return batched, endless_batches(loader)

