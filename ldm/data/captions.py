"""Text-to-image training data from webdataset shards: images with captions, or cached latents with contexts.

Image shards as `tools/make_shards.py` writes them: KEY.jpg or KEY.png, KEY.txt (the caption) and KEY.json
(metadata, with the caption again under "caption"). Latent shards as `tools/encode_latents.py` writes them:
KEY.mean.npy and KEY.std.npy (float16 (C, h, w), the autoencoder posterior's mean and std), KEY.ctx.npy
(float16 (tokens, dim), the text encoder's output for the caption; optional), KEY.txt and KEY.autoencoder.json,
the autoencoder that made them ({"sha256": weights fingerprint, "scale_factor", "checkpoint": path or null}).
For SDXL-style conditioners also KEY.pooled.npy (float16 (dim,), the pooled text embedding) and, wherever the
images went through buckets, KEY.micro.json ({"original_size": [h, w], "crop": [top, left], "target_size":
[h, w], "aesthetic_score": number or null}: the sizes SDXL conditions on, in sgm's order).

Caption dropout makes classifier-free guidance possible (Ho & Salimans 2022, "Classifier-Free Diffusion
Guidance", Algorithm 1): with probability p a caption becomes "". The coin, like the crop and flip, is the
sample's own generator, seeded by (seed, rank, worker, epoch, index), so the same run drops the same captions,
also when resumed mid-epoch. Epochs, shuffling, node/worker splitting and the skipping and counting of broken
shards and samples are `ldm.data.images.ShardStream`'s.
"""
from __future__ import annotations

import io
import json
import random
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from common.errors import InputError
from ldm.data.buckets import (
    Bucket,
    BucketTransform,
    aesthetic_score,
    collate_sizes,
    original_size,
    sample_metadata,
)
from ldm.data.images import ShardStream, decode_shard_image, image_transform

AUTOENCODER_RECORD = "autoencoder.json"  # the key, in each latent sample, of the autoencoder that made it
REENCODE = ("re-encode the image shards: python tools/encode_latents.py --config CONFIG --data IMAGE_SHARDS "
            "--out 'latents/%06d.tar' model.autoencoder_ckpt=AUTOENCODER")


def read_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw shard sample: .txt (UTF-8, outer whitespace stripped), else .json["caption"].
    Raises ValueError (KeyError for none at all) on a sample without a readable caption."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        caption = json.loads(sample["json"]).get("caption")
        if isinstance(caption, str):
            return caption.strip()
    raise KeyError("no caption in sample (looked for .txt and .json 'caption')")


class _CaptionedShards(ShardStream):
    """A `ShardStream` whose samples carry a caption, dropped to "" with probability `caption_dropout`."""

    def __init__(self, urls: str | Sequence[str], *, caption_dropout: float, shuffle_buffer: int, resampled: bool,
                 seed: int):
        if not 0.0 <= caption_dropout <= 1.0:
            raise InputError(f"caption dropout is a probability between 0 and 1, got {caption_dropout}")
        self.caption_dropout = caption_dropout
        super().__init__(urls, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)

    def _caption(self, sample: dict[str, Any]) -> str | None:
        """The sample's caption, or None, recorded in the skip report."""
        try:
            return read_caption(sample)
        except (KeyError, ValueError) as exn:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            self.skip_report.add(self.sample_name(sample), exn)
            return None


class WebDatasetCaptions(_CaptionedShards):
    """Image-caption shards -> {"image": float32 (3, size, size) in [-1, 1], "caption": str, "key": __key__}.

    Images are resized (shorter side, bicubic), cropped (random or center) and optionally flipped by
    `ldm.data.image_transform`; a dropped caption is "". Samples without a readable image or caption are
    skipped and counted in `self.skip_report`, as are broken shards.

    With `buckets` ((height, width) pairs, `ldm.data.buckets.make_buckets`; one square bucket gives square
    crops) each image goes to the nearest bucket instead (`BucketTransform`: (3, h, w)) and the sample also
    holds SDXL's micro-conditioning: "original_size" (h, w), "crop" (top, left), "target_size" (h, w) and
    "aesthetic_score" (KEY.json's, or None). Crops, flips and the caption coin draw from the sample's own
    generator (`ShardStream.positioned`), so a stream is the same on every run. Batch it with
    `ldm.data.position.PositionedBatches` (shape_of="image" for buckets)."""

    sample_needs = "an image (.jpg, .jpeg, .png or .webp) and a caption (.txt, or .json with a 'caption')"

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int,
        *,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        buckets: Sequence[Bucket] | None = None,
    ):
        self.transform = image_transform(size, random_crop=random_crop, random_flip=random_flip)
        self.bucket_transform = (None if buckets is None else
                                 BucketTransform(buckets, random_crop=random_crop, random_flip=random_flip))
        super().__init__(urls, caption_dropout=caption_dropout, shuffle_buffer=shuffle_buffer, resampled=resampled,
                         seed=seed)

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        if (caption := self._caption(sample)) is None:
            return None
        if (image := decode_shard_image(sample, self.skip_report)) is None:
            return None
        if rng.random() < self.caption_dropout:  # p = 0 never drops, p = 1 always: random() is in [0, 1)
            caption = ""
        if self.bucket_transform is None:
            return {"image": self.transform(image, rng=rng), "caption": caption, "key": sample["__key__"]}
        meta = sample_metadata(sample)
        return {**self.bucket_transform(image, rng), "original_size": original_size(meta, image),
                "aesthetic_score": aesthetic_score(meta), "caption": caption, "key": sample["__key__"]}


def _load_npy(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """.npy bytes -> a tensor of `dtype` (never unpickles: object arrays are refused)."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).to(dtype)


class WebDatasetLatents(_CaptionedShards):
    """Cached-latent shards -> {"mean", "std": (C, h, w), "context": (tokens, dim) or None, "caption": str, "key"}
    (+ "pooled": (dim,) or None where the shards hold pooled.npy, and "original_size", "crop", "target_size",
    "aesthetic_score" where they hold micro.json).

    Tensors come back as `dtype` (float32 by default; they are stored as float16). A dropped caption gives
    caption "" and context None: the trainer substitutes the unconditional context (`collate_latents` does).
    A sample without ctx.npy has context None and keeps its caption, for a trainer that encodes text itself.
    Samples without mean/std (or with mismatched shapes) or a caption are skipped and counted.

    With `autoencoder` (the trainer's record: {"sha256", "scale_factor", "checkpoint"}), every sample's
    autoencoder.json must name the same weights (sha256), or iterating raises an InputError: latents of
    another autoencoder would teach the denoiser a latent space its decoder does not read. A different
    scale_factor only warns: the shards hold the unscaled posterior, so the model's own scale_factor applies.
    `self.autoencoder_record` is the last record read (in this process)."""

    latents = True
    sample_needs = ".mean.npy, .std.npy, a caption (.txt) and .autoencoder.json, as tools/encode_latents.py writes"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        caption_dropout: float = 0.1,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        autoencoder: dict[str, Any] | None = None,
    ):
        self.dtype = dtype
        self.autoencoder = autoencoder
        self.autoencoder_record: dict[str, Any] | None = None
        self._scale_factor_noted = False
        super().__init__(urls, caption_dropout=caption_dropout, shuffle_buffer=shuffle_buffer, resampled=resampled,
                         seed=seed)

    def _check_autoencoder(self, sample: dict[str, Any]) -> None:
        """Read the sample's autoencoder record; with `self.autoencoder`, refuse another autoencoder's latents."""
        if AUTOENCODER_RECORD in sample:
            self.autoencoder_record = _read_record(sample, self.sample_name(sample))
        expected, record = self.autoencoder, self.autoencoder_record
        if expected is None:
            return
        if AUTOENCODER_RECORD not in sample:
            raise InputError(f"latent sample {self.sample_name(sample)} does not record the autoencoder that made it "
                             f"(no {AUTOENCODER_RECORD}: an older tools/encode_latents.py wrote it); {REENCODE}")
        if record["sha256"] != expected["sha256"]:
            made_by = record["checkpoint"]
            fix = (f"pass model.autoencoder_ckpt={made_by} (the one tools/encode_latents.py used), or re-encode "
                   "the shards with this model's autoencoder" if made_by else "re-encode the shards with this "
                   "model's autoencoder (tools/encode_latents.py with the same config and overrides)")
            raise InputError(f"{self.source} holds latents of autoencoder {describe_autoencoder(record)}, but this "
                             f"model's autoencoder is {describe_autoencoder(expected)}: {fix}")
        if record["scale_factor"] != float(expected["scale_factor"]) and not self._scale_factor_noted:
            self._scale_factor_noted = True
            warnings.warn(f"{self.source} was encoded when the autoencoder's scale_factor was "
                          f"{record['scale_factor']}; this model's, {expected['scale_factor']}, applies (the shards "
                          "hold the unscaled posterior)", RuntimeWarning)

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        if (caption := self._caption(sample)) is None:
            return None
        try:
            mean, std = (_load_npy(sample[name], self.dtype) for name in ("mean.npy", "std.npy"))
            context = _load_npy(sample["ctx.npy"], self.dtype) if "ctx.npy" in sample else None
            extra = _read_extras(sample, self.dtype)
            if mean.shape != std.shape:
                raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
        except Exception as exn:  # KeyError for a missing array, ValueError for bad .npy data
            self.skip_report.add(self.sample_name(sample), exn)
            return None
        self._check_autoencoder(sample)
        if rng.random() < self.caption_dropout:
            caption, context = "", None
            extra.update({"pooled": None} if "pooled" in extra else {})
        return {"mean": mean, "std": std, "context": context, **extra, "caption": caption, "key": sample["__key__"]}


def _read_extras(sample: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A latent sample's optional SDXL parts: "pooled" (pooled.npy) and the sizes of micro.json. ValueError (or
    KeyError, TypeError) on unreadable ones."""
    extra: dict[str, Any] = {}
    if "pooled.npy" in sample:
        extra["pooled"] = _load_npy(sample["pooled.npy"], dtype)
    if "micro.json" in sample:
        micro = json.loads(sample["micro.json"])
        for name in ("original_size", "crop", "target_size"):
            pair = tuple(int(v) for v in micro[name])
            if len(pair) != 2:
                raise ValueError(f"micro.json {name} must be two numbers, got {micro[name]!r}")
            extra[name] = pair
        score = micro.get("aesthetic_score")
        extra["aesthetic_score"] = None if score is None else float(score)
    return extra


def _read_record(sample: dict[str, Any], name: str) -> dict[str, Any]:
    """A latent sample's autoencoder.json as {"sha256": str, "scale_factor": float, "checkpoint": str or None}."""
    try:
        record = json.loads(sample[AUTOENCODER_RECORD])
        return {"sha256": str(record["sha256"]), "scale_factor": float(record["scale_factor"]),
                "checkpoint": record.get("checkpoint")}
    except (ValueError, KeyError, TypeError, AttributeError) as exn:  # bad JSON, missing keys, not an object
        raise InputError(f"latent sample {name}: unreadable {AUTOENCODER_RECORD} ({type(exn).__name__}: {exn}); "
                         f"{REENCODE}") from None


def describe_autoencoder(record: dict[str, Any]) -> str:
    """'1a2b3c4d5e6f (runs/ae/autoencoder.safetensors, scale_factor 0.18215)': a record, short, for messages."""
    origin = record.get("checkpoint") or "random weights"
    return f"{record['sha256'][:12]} ({origin}, scale_factor {record['scale_factor']})"


# the names the training scripts use
caption_dataset = WebDatasetCaptions
latent_dataset = WebDatasetLatents


def collate_latents(samples: list[dict[str, Any]], *, uncond_context: torch.Tensor | None = None,
                    uncond_pooled: torch.Tensor | None = None) -> dict[str, Any]:
    """A DataLoader batch of `WebDatasetLatents` samples: mean and std stacked, caption and key as lists, context
    stacked with `uncond_context` (the text encoder's output for "") in the rows of dropped captions.

    context is None when no sample has one and no `uncond_context` is given (the trainer encodes the captions).
    Samples with a pooled embedding (SDXL) also give "pooled", with `uncond_pooled` in the rows of dropped
    captions, and samples with sizes give them as `ldm.data.buckets.collate_sizes` does.
    Use `functools.partial(collate_latents, uncond_context=...)` as `collate_fn`."""
    shapes = {tuple(sample["mean"].shape) for sample in samples}
    if len(shapes) > 1:
        raise InputError(f"latents of {len(shapes)} shapes {sorted(shapes)} in one batch: the shards were encoded with "
                         "aspect-ratio buckets, so train with train.buckets=true (one bucket per batch)")
    contexts = [sample["context"] for sample in samples]
    if all(context is None for context in contexts) and uncond_context is None:
        stacked = None
    else:
        for sample, context in zip(samples, contexts):
            if context is None and sample["caption"] != "":
                raise ValueError(f"latent sample {sample['key']} has a caption but no ctx.npy: shards without text "
                                 "contexts need the captions encoded in the training loop")
            if context is None and uncond_context is None:
                raise ValueError("a caption was dropped: pass uncond_context, the text encoder's output for \"\"")
        stacked = torch.stack([uncond_context.to(samples[0]["mean"].dtype) if c is None else c for c in contexts])
    batch = {
        "mean": torch.stack([sample["mean"] for sample in samples]),
        "std": torch.stack([sample["std"] for sample in samples]),
        "context": stacked,
        "caption": [sample["caption"] for sample in samples],
        "key": [sample["key"] for sample in samples],
    }
    if "pooled" in samples[0] and stacked is not None:
        pooled = [sample.get("pooled") for sample in samples]
        if uncond_pooled is None and any(p is None for p in pooled):
            raise ValueError("a caption was dropped: pass uncond_pooled, the conditioner's pooled output for \"\"")
        batch["pooled"] = torch.stack([uncond_pooled.to(batch["mean"].dtype) if p is None else p for p in pooled])
    if "original_size" in samples[0]:
        batch.update(collate_sizes(samples))
    return batch
