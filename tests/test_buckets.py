"""ldm/data/buckets.py: the bucket list, the nearest bucket, the recorded crop, one bucket per batch."""
from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.errors import InputError
from ldm.data.buckets import (
    collate_images,
    cover_size,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    unbatched,
)
from ldm.data.captions import WebDatasetCaptions, collate_latents
from ldm.data.position import PositionedBatches

from helpers import _photos

CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"]
SHAPES = [(48, 32), (32, 48), (40, 40), (56, 32), (32, 56), (36, 36)]  # (width, height): wide, tall, square


def write_mixed_shards(folder: Path, *, shards: int = 2, per_shard: int = 16) -> str:
    """Shards of crops of real photographs in six shapes (SHAPES), captioned; every other sample has a KEY.json
    whose "original_size" [w, h] is 4x its size (as make_shards.py records an image it shrank)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(p).convert("RGB") for p in _photos()]
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as sink:
            for k in range(per_shard):
                i = shard * per_shard + k
                width, height = SHAPES[i % len(SHAPES)]
                photo = photos[i % len(photos)]
                scale = rng.uniform(3, 6)
                crop_w, crop_h = int(min(photo.width, width * scale)), int(min(photo.height, height * scale))
                x0 = int(rng.integers(0, photo.width - crop_w + 1))
                y0 = int(rng.integers(0, photo.height - crop_h + 1))
                image = photo.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((width, height), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                sample = {"__key__": f"s{shard}_{k:03d}", "png": buffer.getvalue(), "txt": CAPTIONS[k % 4]}
                if i % 2 == 0:
                    sample["json"] = json.dumps({"original_size": [4 * width, 4 * height], "size": [width, height]})
                sink.write(sample)
    return str(folder / ("{000000..%06d}.tar" % (shards - 1)))


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> str:
    return write_mixed_shards(tmp_path_factory.mktemp("mixed"))


@pytest.mark.parametrize("size,multiple,max_ratio", [(1024, 64, 4.0), (1024, 64, 2.0), (512, 64, 2.0), (256, 8, 3.0),
                                                     (32, 8, 2.0)])
def test_bucket_list_properties(size, multiple, max_ratio):
    buckets = make_buckets(size, multiple=multiple, max_ratio=max_ratio)
    assert (size, size) in buckets and len(set(buckets)) == len(buckets)
    assert set(buckets) == {(w, h) for h, w in buckets}  # both orientations of every shape
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert max(h, w) / min(h, w) <= max_ratio
        # never more pixels than the square; less by under one multiple-wide strip of the short side
        assert size * size * (1 - multiple / size) < h * w <= size * size
    # the short sides are every multiple the ratio allows: no gaps in the ladder
    shorts = sorted({min(b) for b in buckets})
    assert shorts == list(range(shorts[0], size + 1, multiple))


def test_the_sdxl_table_shapes_are_there():
    """SDXL's bucket table (Podell et al. 2023, appendix I) lists, for each short side, the long side with the
    most pixels up to 1024^2: the same rule."""
    buckets = make_buckets(1024, multiple=64, max_ratio=4.0)
    for shape in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1600, 640), (2048, 512)]:
        assert shape in buckets and shape[::-1] in buckets
    assert len(make_buckets(32, multiple=8)) == 3  # 24x40, 32x32, 40x24


def test_bad_bucket_settings_are_one_line_errors():
    with pytest.raises(InputError, match="multiple of the model's size multiple 8"):
        make_buckets(36, multiple=8)
    with pytest.raises(InputError, match="bucket_max_ratio must be a number >= 1"):
        make_buckets(32, multiple=8, max_ratio=0.5)


def test_nearest_bucket_by_aspect_ratio():
    buckets = make_buckets(1024, multiple=64, max_ratio=4.0)
    assert nearest_bucket(buckets, 1000, 1010) == (1024, 1024)
    assert nearest_bucket(buckets, 768, 1366) == (768, 1344)     # 16:9 landscape
    assert nearest_bucket(buckets, 1366, 768) == (1344, 768)     # and portrait
    assert nearest_bucket(buckets, 100, 10_000) == (512, 2048)   # beyond the widest: the widest
    for h, w in [(300, 500), (640, 480), (1920, 1080), (50, 51)]:
        best = min(abs(math.log(b[0] / b[1]) - math.log(h / w)) for b in buckets)
        got = nearest_bucket(buckets, h, w)
        assert abs(math.log(got[0] / got[1]) - math.log(h / w)) == best


def _photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(_photos()[1]).convert("RGB").resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("random_crop,flip", [(True, False), (False, False), (True, True)])
def test_the_recorded_crop_locates_the_sample_in_the_resized_image(random_crop, flip):
    for width, height, bucket in [(97, 50, (24, 40)), (50, 97, (40, 24)), (64, 64, (32, 32)), (80, 30, (24, 40))]:
        image = _photo(width, height)
        out, (top, left) = fit_to_bucket(image, bucket, random_crop=random_crop, rng=random.Random(3), flip=flip)
        assert (out.height, out.width) == bucket
        resized_h, resized_w = cover_size(height, width, bucket)
        assert resized_h >= bucket[0] and resized_w >= bucket[1] and (resized_h == bucket[0] or resized_w == bucket[1])
        resized = TF.resize(image, [resized_h, resized_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            resized = TF.hflip(resized)
        expected = TF.crop(resized, top, left, *bucket)
        assert np.array_equal(np.asarray(out), np.asarray(expected))
        if not random_crop:
            assert (top, left) == ((resized_h - bucket[0]) // 2, (resized_w - bucket[1]) // 2)


def test_random_crops_vary_and_follow_the_seed():
    image = _photo(120, 40)
    corners = [fit_to_bucket(image, (24, 40), random_crop=True, rng=random.Random(seed))[1] for seed in range(20)]
    assert len(set(corners)) > 5 and all(top == 0 for top, _ in corners)  # a wide image is cropped sideways
    again = [fit_to_bucket(image, (24, 40), random_crop=True, rng=random.Random(seed))[1] for seed in range(20)]
    assert corners == again


def _bucketed(shards: str, *, batch_size: int = 4, seed: int = 0, resampled: bool = False, **kw) -> PositionedBatches:
    dataset = WebDatasetCaptions(shards, 32, caption_dropout=0.0, buckets=make_buckets(32, multiple=8),
                                 shuffle_buffer=20, resampled=resampled, seed=seed, **kw)
    return PositionedBatches(dataset, batch_size, collate=collate_images, shape_of="image")


def test_every_batch_is_one_bucket_and_a_pass_sees_every_sample_once(mixed_shards):
    batches = list(DataLoader(_bucketed(mixed_shards), batch_size=None, collate_fn=unbatched))
    keys = [key for batch in batches for key in batch["key"]]
    assert sorted(keys) == sorted(f"s{s}_{k:03d}" for s in range(2) for k in range(16))  # partial buckets too
    sizes = {}
    for batch in batches:
        h, w = batch["image"].shape[-2:]
        assert batch["target_size"].tolist() == [[h, w]] * len(batch["key"])  # one bucket per batch
        assert 1 <= len(batch["key"]) <= 4
        for i, key in enumerate(batch["key"]):
            sizes[key] = (batch["original_size"][i].tolist(), (h, w), batch["crop"][i].tolist())
    assert {len(b["key"]) for b in batches[:-3]} == {4}  # only the last batches (one per bucket at most) are partial
    assert {size for _, size, _ in sizes.values()} == {(24, 40), (32, 32), (40, 24)}
    for key, (original, bucket, crop) in sizes.items():
        shard, k = int(key[1]), int(key[3:])
        i = shard * 16 + k
        width, height = SHAPES[i % len(SHAPES)]
        assert bucket == nearest_bucket(make_buckets(32, multiple=8), height, width)
        # KEY.json's original_size [w, h] where there is one, else the decoded size; (h, w) either way
        assert original == ([4 * height, 4 * width] if i % 2 == 0 else [height, width])
        resized = cover_size(height, width, bucket)
        assert 0 <= crop[0] <= resized[0] - bucket[0] and 0 <= crop[1] <= resized[1] - bucket[1]


def test_bucketed_streams_follow_the_seed(mixed_shards):
    def run(seed):
        stream = iter(DataLoader(_bucketed(mixed_shards, seed=seed, resampled=True, random_flip=True), batch_size=None,
                                 collate_fn=unbatched))
        batches = [next(stream) for _ in range(6)]
        return [(b["key"], b["crop"].tolist(), b["image"].sum().item()) for b in batches]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_mixed_latent_shapes_without_buckets_are_a_one_line_error():
    item = {"mean": torch.zeros(4, 8, 8), "std": torch.ones(4, 8, 8), "context": None, "caption": "a", "key": "k"}
    wide = {**item, "mean": torch.zeros(4, 6, 10), "std": torch.ones(4, 6, 10)}
    with pytest.raises(InputError, match="train with train.buckets=true"):
        collate_latents([item, wide])
