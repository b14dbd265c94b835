"""Aspect-ratio buckets: train on whole images of many shapes, each batch of one shape.

As NovelAI's aspect-ratio bucketing (2022), kohya sd-scripts' `make_bucket_resolutions` and SDXL's bucket
table (Podell et al. 2023, sec. 2.3 and appendix I): a list of (height, width) buckets with about the pixel
count of the square training size, sides multiples of the model's `size_multiple`, aspect ratios up to a
limit. Each image goes to the bucket nearest its aspect ratio, is resized (bicubic, antialiased) to cover it
and cropped to it (random or centred). What SDXL conditions on is recorded with each sample, in sgm's
(height, width) / (top, left) order: `original_size` (KEY.json's "original_size" [w, h] where make_shards.py
wrote one, the size before it resized; else the decoded image's), `crop` (the crop's top-left corner in the
resized image's pixels; of the flipped image when the sample was flipped, as kohya records it) and
`target_size` (the bucket).

`ldm.data.position.PositionedBatches` (shape_of="image", or "mean" for latents) turns such a stream into batches
of one bucket each: one buffer per bucket, a batch when a buffer is full; at each epoch's end (and a finite
pass's) the partial buffers go out as smaller batches, the one with the oldest waiting sample first, so every
sample of a pass is seen once and none waits into another epoch.
"""
from __future__ import annotations

import json
import math
import random
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.errors import InputError
from ldm.images import to_rgb

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(size: int, *, multiple: int, max_ratio: float = 2.0) -> list[Bucket]:
    """The buckets of a square training `size`: for each short side s (a multiple of `multiple`, up to
    `size`), the long side is the largest multiple with s x long <= size**2 (so no bucket has more pixels
    than the square, and each is within `multiple / size` of it), kept where long / s <= `max_ratio`; both
    orientations. Sorted by aspect ratio (height / width: landscape first); the square is always one."""
    if multiple < 1 or size < multiple or size % multiple:
        nearest = max(multiple, size // multiple * multiple)
        raise InputError(f"bucket size {size} must be a positive multiple of the model's size multiple {multiple} "
                         f"(pixels per latent step); set train.image_size to one, e.g. {nearest}")
    if not (math.isfinite(max_ratio) and max_ratio >= 1):
        raise InputError(f"train config: bucket_max_ratio must be a number >= 1 (long side / short side), "
                         f"got {max_ratio}")
    area = size * size
    buckets = set()
    for short in range(multiple, size + 1, multiple):
        long = area // short // multiple * multiple
        if long / short <= max_ratio:
            buckets.update({(long, short), (short, long)})
    return sorted(buckets, key=lambda b: (b[0] / b[1], b))


def nearest_bucket(buckets: Sequence[Bucket], height: int, width: int) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, on a log scale (so 2:1 and 1:2 are as far from
    1:1); ties go to the earlier bucket."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """(height, width) of an image of `height` x `width` scaled to cover `bucket`: by the larger of the two
    side ratios, so one side fits the bucket exactly and only the other is cropped."""
    scale = max(bucket[0] / height, bucket[1] / width)
    return max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale))


def fit_to_bucket(image: Image.Image, bucket: Bucket, *, random_crop: bool, rng: random.Random | None = None,
                  flip: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """(the image resized to cover `bucket` (`cover_size`; bicubic, antialiased) and cropped to it, the crop's
    (top, left) in the resized image). `random_crop` draws the corner from `rng`, else the crop is centred.
    With `flip` the crop is mirrored and (top, left) is that of the mirrored resized image."""
    height, width = bucket
    resized_h, resized_w = cover_size(image.height, image.width, bucket)
    resized = TF.resize(image, [resized_h, resized_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, resized_h - height), rng.randint(0, resized_w - width)
    else:
        top, left = (resized_h - height) // 2, (resized_w - width) // 2
    cropped = TF.crop(resized, top, left, height, width)
    if flip:
        cropped, left = TF.hflip(cropped), resized_w - width - left
    return cropped, (top, left)


class BucketTransform:
    """PIL image -> {"image": float32 (3, h, w) in [-1, 1], "target_size": (h, w), "crop": (top, left)} for the
    nearest of `buckets`; RGB with transparency on white, as `ldm.data.image_transform`. Random crops and flips
    draw from the `rng` given per call (the sample's own: `ldm.data.images.ShardStream.positioned`)."""

    def __init__(self, buckets: Sequence[Bucket], *, random_crop: bool, random_flip: bool):
        if not buckets:
            raise InputError("the bucket list is empty: check train.image_size and train.bucket_max_ratio")
        self.buckets = [tuple(int(side) for side in b) for b in buckets]
        self.random_crop, self.random_flip = random_crop, random_flip

    def __call__(self, image: Image.Image, rng: random.Random) -> dict[str, Any]:
        image = to_rgb(image)
        bucket = nearest_bucket(self.buckets, image.height, image.width)
        flip = self.random_flip and rng.random() < 0.5
        cropped, crop = fit_to_bucket(image, bucket, random_crop=self.random_crop, rng=rng, flip=flip)
        return {"image": TF.pil_to_tensor(cropped).float().div(127.5).sub(1.0), "target_size": bucket, "crop": crop}


def sample_metadata(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw shard sample's KEY.json as a dict ({} when it has none or it is unreadable: the sizes are optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def original_size(meta: dict[str, Any], image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image before make_shards.py resized it: KEY.json's "original_size" [w, h] when it
    holds two positive whole numbers, else the decoded image's own size."""
    size = meta.get("original_size")
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return int(size[1]), int(size[0])
    return image.height, image.width


def aesthetic_score(meta: dict[str, Any]) -> float | None:
    """KEY.json's "aesthetic_score" (SDXL refiner's conditioning), or None."""
    score = meta.get("aesthetic_score")
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None


def collate_sizes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The micro-conditioning of a batch: "original_size", "crop", "target_size" as int64 [B, 2] and
    "aesthetic_score" as a list (None where a sample has none)."""
    out: dict[str, Any] = {name: torch.tensor([list(item[name]) for item in items], dtype=torch.long)
                           for name in ("original_size", "crop", "target_size")}
    out["aesthetic_score"] = [item.get("aesthetic_score") for item in items]
    return out


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of bucketed image-caption samples: images stacked, the sizes (`collate_sizes`), captions and keys."""
    return {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items],
            "key": [item["key"] for item in items], **collate_sizes(items)}


def unbatched(batch: Any) -> Any:
    """The DataLoader's `collate_fn` for batches made in the workers (`PositionedBatches`, batch_size=None): the
    batch as it is."""
    return batch
