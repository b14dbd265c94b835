"""tools/train_ldm.py's data: image-caption or cached-latent shards -> endless training batches.

Without buckets and for a plain text encoder, batches are today's square crops (or cached latents of one
shape). With `train.buckets`, or for an SDXL-style conditioner (which needs each sample's original size and crop
even for square crops: one square bucket), the stream is batched per bucket, every batch of one shape. Either
way the loader workers batch (`ldm.data.position.PositionedBatches`) and the batches know where the stream is,
so a resumed run continues it exactly (`ResumableBatches.state()`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import DataLoader

from ldm.data.buckets import Bucket, collate_images, make_buckets, unbatched
from ldm.data.captions import WebDatasetCaptions, WebDatasetLatents, collate_latents
from ldm.data.position import PositionedBatches, ResumableBatches
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
                     buckets: list[Bucket] | None, uncond: dict[str, torch.Tensor], autoencoder: dict | None,
                     resume_state: dict[str, Any] | None = None) -> tuple[Any, ResumableBatches]:
    """(the dataset, for its skip count; endless batches {"image" | "mean","std","context"[,"pooled"], "caption",
    "key"[, "original_size", "crop", "target_size", "aesthetic_score"]}, with `.state()`).

    Cached contexts of dropped captions are filled from `uncond` (`unconditional_for_cache`); cached latents must
    record `autoencoder` (`autoencoder_record`). With `buckets` (`training_buckets`), batches are of one bucket
    each. The first batch is read now: data with no usable sample (or another autoencoder's latents) stops the
    run before it starts, with one line.

    Resuming: `resume_state` is this rank's `state()` saved at the checkpoint. From the same data, seed, world size,
    loader workers and batch size, the batches go on exactly as an uninterrupted run's would
    (`ldm.data.position`); otherwise one printed line says why, and the stream is reseeded by the step instead."""
    stream = dict(caption_dropout=cfg.caption_dropout, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                  seed=cfg.seed)
    if latents:
        dataset = WebDatasetLatents(latents, autoencoder=autoencoder, **stream)
        collate, shape_of = functools.partial(collate_latents, **uncond), "mean"
    else:
        dataset = WebDatasetCaptions(data, cfg.image_size, random_crop=cfg.random_crop,
                                     random_flip=cfg.random_flip, buckets=buckets, **stream)
        collate, shape_of = (collate_images if buckets is not None else None), "image"
    batched = PositionedBatches(dataset, cfg.batch_size, collate=collate,
                                shape_of=shape_of if buckets is not None else None)
    loader = DataLoader(batched, batch_size=None, num_workers=cfg.num_workers, collate_fn=unbatched,
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    # A resume that cannot continue the stream reshuffles rather than replaying the first batches.
    batches = ResumableBatches(loader, seed=cfg.seed, resume=resume_state, reseed=cfg.seed + 1000 * step)
    if batches.problem is not None and (resume_state is not None or step > 0):
        print(f"data position: {batches.problem}; the data stream is reseeded (seed {dataset.seed}) rather than "
              "continued exactly", flush=True)
    return dataset, batches.start()
