"""ldm.data: transforms, image folders with broken files, webdataset shards, held-out split."""
from __future__ import annotations

import io
import itertools
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import InputError
from ldm.data.images import (
    ImageFolder,
    WebDatasetImages,
    build_image_dataset,
    endless_batches,
    image_transform,
    split_held_out,
    worker_error_message,
)

SIZE = 16


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _rgba_half_transparent() -> Image.Image:
    """Left half fully transparent black, right half opaque black."""
    pixels = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    pixels[:, SIZE // 2 :, 3] = 255
    return Image.fromarray(pixels, "RGBA")


GOOD = ["a_rgb.jpg", "b_rgba.png", "c_gray.png", "d_wide.webp", "nested/e_photo.JPG"]
BAD = ["corrupt.png", "truncated.jpg"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five readable images of different modes and shapes, two unreadable ones, and files to ignore."""
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    (root / ".cache").mkdir()
    _noise(24, 24, 0).save(root / "a_rgb.jpg")
    _rgba_half_transparent().save(root / "b_rgba.png")
    Image.new("L", (20, 20), 128).save(root / "c_gray.png")
    _noise(40, 20, 1).save(root / "d_wide.webp")
    _noise(30, 30, 2).save(root / "nested" / "e_photo.JPG")
    (root / "corrupt.png").write_bytes(np.random.default_rng(3).bytes(500))
    (root / "truncated.jpg").write_bytes(_jpeg_bytes(_noise(64, 64, 4))[:600])
    (root / "notes.txt").write_text("not an image")
    _noise(8, 8, 5).save(root / ".hidden.png")
    _noise(8, 8, 6).save(root / ".cache" / "thumb.png")
    return root


def _read_all(dataset) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [dataset[i] for i in range(len(dataset))]


# --- image_transform -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        _noise(24, 24, 0),
        _rgba_half_transparent(),
        Image.new("L", (20, 30), 77),
        Image.new("LA", (20, 20), (10, 0)),
        _noise(40, 20, 1).convert("P"),
        Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)),  # 16-bit grayscale
        _noise(7, 5, 2),  # smaller than SIZE: upscaled
    ],
    ids=["rgb", "rgba", "gray", "gray-alpha", "palette", "gray16", "tiny"],
)
def test_transform_shape_dtype_range(image: Image.Image) -> None:
    for random_crop, random_flip in [(False, False), (True, True)]:
        x = image_transform(SIZE, random_crop=random_crop, random_flip=random_flip)(image)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0


def test_transparent_pixels_become_white() -> None:
    x = image_transform(SIZE, random_crop=False, random_flip=False)(_rgba_half_transparent())
    assert torch.all(x[:, :, 0] == 1.0)  # fully transparent black -> white
    assert torch.all(x[:, :, -1] == -1.0)  # opaque black stays black


def test_palette_transparency_and_16_bit_gray() -> None:
    transform = image_transform(SIZE, random_crop=False, random_flip=False)
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert torch.all(transform(palette) == 1.0)
    # 40000 / 65535 of full scale: 40000 >> 8 = 156 -> 156 / 127.5 - 1 (Pillow alone would clip to 255)
    gray16 = Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16))
    assert torch.allclose(transform(gray16), torch.tensor(156 / 127.5 - 1), atol=1e-6)


def test_grayscale_gives_equal_channels() -> None:
    x = image_transform(SIZE, random_crop=False, random_flip=False)(Image.new("L", (20, 20), 128))
    assert torch.allclose(x, torch.tensor(128 / 127.5 - 1), atol=1e-6)


def test_center_crop_of_wide_image_keeps_the_middle() -> None:
    # 3 vertical bands of width SIZE: red | green | blue; the shorter side is already SIZE
    bands = np.zeros((SIZE, 3 * SIZE, 3), dtype=np.uint8)
    for band in range(3):
        bands[:, band * SIZE : (band + 1) * SIZE, band] = 255
    x = image_transform(SIZE, random_crop=False, random_flip=False)(Image.fromarray(bands))
    assert torch.all(x[1] == 1.0) and torch.all(x[0] == -1.0) and torch.all(x[2] == -1.0)


def test_random_crop_and_flip_vary() -> None:
    torch.manual_seed(0)
    transform = image_transform(SIZE, random_crop=True, random_flip=True)
    image = _noise(3 * SIZE, SIZE, 0)
    outputs = {tuple(transform(image).flatten()[:8].tolist()) for _ in range(20)}
    assert len(outputs) > 1


def test_transform_rejects_bad_size() -> None:
    with pytest.raises(InputError, match="positive"):
        image_transform(0, random_crop=False, random_flip=False)


# --- ImageFolder -------------------------------------------------------------------------------------


def test_folder_lists_images_recursively_sorted(folder: Path) -> None:
    dataset = ImageFolder(folder, SIZE)
    assert dataset.files == sorted(GOOD + BAD)  # hidden files, .cache/ and notes.txt left out
    assert ImageFolder(str(folder), SIZE).files == dataset.files


def test_folder_items(folder: Path) -> None:
    dataset = ImageFolder(folder, SIZE)
    item = dataset[dataset.files.index("b_rgba.png")]
    assert item["key"] == "b_rgba.png"
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert torch.all(item["image"][:, :, 0] == 1.0)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_folder_skips_and_counts_unreadable_files(folder: Path) -> None:
    dataset = ImageFolder(folder, SIZE)
    with pytest.warns(RuntimeWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    assert {item["key"] for item in items} == set(GOOD)
    assert dataset.skipped == len(BAD)
    assert sorted(name for name, _ in dataset.skip_report.examples) == sorted(BAD)
    assert sorted(str(w.message).split()[1] for w in caught) == sorted(BAD)  # one warning per file
    # a bad file is replaced by the next readable one: corrupt.png -> d_wide.webp
    assert dataset[dataset.files.index("corrupt.png")]["key"] == "d_wide.webp"
    # a second pass neither counts nor warns again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {dataset[i]["key"] for i in range(len(dataset))} == set(GOOD)
    assert dataset.skipped == len(BAD)


def test_verify_drops_unreadable_files(folder: Path) -> None:
    dataset = ImageFolder(folder, SIZE)
    with pytest.warns(RuntimeWarning):
        report = dataset.verify()
    assert report is dataset.skip_report and len(report) == report.count == dataset.skipped == len(BAD)
    assert report[0][0] in BAD and "Error" in report[0][1]  # (name, reason)
    assert dataset.files == sorted(GOOD)
    assert [item["key"] for item in _read_all(dataset)] == sorted(GOOD)


def test_verify_of_a_clean_folder_reports_nothing(tmp_path: Path) -> None:
    _noise(SIZE, SIZE, 0).save(tmp_path / "only.png")
    report = ImageFolder(tmp_path, SIZE).verify()
    assert not report and len(report) == 0


def test_all_unreadable_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not a png")
    (tmp_path / "y.jpg").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(InputError, match="none of the 2 images"):
            ImageFolder(tmp_path, SIZE)[0]
        with pytest.raises(InputError, match="none of the 2 images"):
            ImageFolder(tmp_path, SIZE).verify()


@pytest.mark.parametrize("with_other_files", [False, True])
def test_folder_without_images_is_an_input_error(tmp_path: Path, with_other_files: bool) -> None:
    if with_other_files:
        (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as error:
        ImageFolder(tmp_path, SIZE)
    message = str(error.value)
    assert message.startswith(f"no images found in {tmp_path} (looked for .png, .jpg, ")
    assert "point --data at a folder of images or at webdataset shards like 'shards/{000000..000009}.tar'" in message


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ImageFolder(tmp_path / "nope", SIZE)


# --- held-out split ----------------------------------------------------------------------------------


def test_held_out_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    for i in range(10):
        _noise(SIZE, SIZE, i).save(tmp_path / f"{i:02d}.png")
    dataset = ImageFolder(tmp_path, SIZE, random_flip=True)
    train, held_out = split_held_out(dataset, 3, seed=1)
    train_again, held_out_again = split_held_out(ImageFolder(tmp_path, SIZE), 3, seed=1)
    assert held_out.indices == held_out_again.indices and train.indices == train_again.indices
    assert len(held_out) == 3 and len(train) == 7
    assert sorted(train.indices + held_out.indices) == list(range(10))
    assert split_held_out(dataset, 3, seed=2)[1].indices != held_out.indices  # a different draw
    # held-out images are never flipped or randomly cropped: the same pixels every time
    torch.manual_seed(0)
    assert all(torch.equal(held_out[0]["image"], held_out[0]["image"]) for _ in range(10))


def test_held_out_split_needs_enough_images(folder: Path) -> None:
    dataset = ImageFolder(folder, SIZE)
    with pytest.raises(InputError, match="cannot hold out 7 of the 7 images"):
        split_held_out(dataset, 7)


# --- webdataset shards -------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path: Path) -> str:
    """Two shards: 3 good samples, then 2 good samples and 1 corrupt one; returns the brace pattern."""
    samples = [
        [{"__key__": "s0_a", "jpg": _jpeg_bytes(_noise(24, 20, 0))},
         {"__key__": "s0_b", "png": _png_bytes(_rgba_half_transparent())},
         {"__key__": "s0_c", "webp": _png_bytes(_noise(20, 20, 1)), "txt": b"caption"}],  # png bytes, .webp name
        [{"__key__": "s1_a", "jpeg": _jpeg_bytes(_noise(30, 20, 2))},
         {"__key__": "s1_bad", "png": os.urandom(300)},
         {"__key__": "s1_b", "png": _png_bytes(Image.new("L", (20, 20), 9))}],
    ]
    for index, shard in enumerate(samples):
        with wds.TarWriter(str(tmp_path / f"shard-{index:06d}.tar")) as writer:
            for sample in shard:
                writer.write(sample)
    return str(tmp_path / "shard-{000000..000001}.tar")


SHARD_KEYS = ["s0_a", "s0_b", "s0_c", "s1_a", "s1_b"]


def test_shards_yield_exactly_the_good_samples(shards: str) -> None:
    dataset = WebDatasetImages(shards, SIZE, resampled=False, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match="s1_bad"):
        items = list(dataset)
    assert [item["key"] for item in items] == SHARD_KEYS
    assert all(item["image"].shape == (3, SIZE, SIZE) for item in items)
    assert dataset.skipped == 1 and dataset.skip_report[0][0].endswith("shard-000001.tar:s1_bad")


def test_shuffled_single_pass_yields_each_good_sample_once(shards: str) -> None:
    dataset = WebDatasetImages([shards], SIZE, resampled=False, shuffle_buffer=10, random_crop=True, random_flip=True)
    with pytest.warns(RuntimeWarning):
        assert sorted(item["key"] for item in dataset) == SHARD_KEYS
    assert dataset.skipped == 1


def test_resampled_stream_is_endless(shards: str) -> None:
    dataset = WebDatasetImages(shards, SIZE, resampled=True, shuffle_buffer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        keys = [item["key"] for item in itertools.islice(dataset, 40)]
    assert len(keys) == 40 and set(keys) <= set(SHARD_KEYS)


def test_truncated_shard_is_skipped_and_counted(shards: str, tmp_path: Path) -> None:
    whole = tmp_path / "shard-000000.tar"
    with tarfile.open(whole) as tar:
        cut = tar.getmember("s0_b.png").offset_data + 40  # in the middle of the second sample's png
    (tmp_path / "shard-000002.tar").write_bytes(whole.read_bytes()[:cut])
    dataset = WebDatasetImages(str(tmp_path / "shard-{000000..000002}.tar"), SIZE, resampled=False, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning) as caught:
        keys = [item["key"] for item in dataset]
    assert sum("shard-000002.tar (unreadable)" in str(w.message) for w in caught) == 1
    assert keys == SHARD_KEYS + ["s0_a"]  # the truncated copy of shard 0 yields what precedes the cut
    assert dataset.skipped == 2  # s1_bad and the truncated shard


def test_missing_shards_are_an_input_error(shards: str, tmp_path: Path) -> None:
    pattern = str(tmp_path / "other-{000000..000003}.tar")
    with pytest.raises(InputError, match="4 of the 4 shards in .*other-.* do not exist"):
        WebDatasetImages(pattern, SIZE)
    with pytest.raises(InputError, match="2 of the 4 shards in .* do not exist .first: .*shard-000002.tar"):
        WebDatasetImages(str(tmp_path / "shard-{000000..000003}.tar"), SIZE)


# --- build_image_dataset and DataLoader --------------------------------------------------------------


def test_build_dispatches_on_the_source(folder: Path, shards: str, tmp_path: Path) -> None:
    assert isinstance(build_image_dataset(str(folder), SIZE), ImageFolder)
    assert isinstance(build_image_dataset(shards, SIZE), WebDatasetImages)
    assert isinstance(build_image_dataset(str(tmp_path / "shard-000000.tar"), SIZE, train=False), WebDatasetImages)
    with pytest.raises(InputError, match="neither an existing folder of images nor .tar shards"):
        build_image_dataset(str(tmp_path / "missing_folder"), SIZE)


def test_dataloader_batches_folder_and_shards(folder: Path, shards: str) -> None:
    images = build_image_dataset(str(folder), SIZE, train=True)
    with pytest.warns(RuntimeWarning):
        images.verify()
    batch = next(iter(DataLoader(images, batch_size=4, shuffle=True, num_workers=0)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and len(batch["key"]) == 4

    stream = build_image_dataset(shards, SIZE, train=False)
    with pytest.warns(RuntimeWarning):
        batches = list(DataLoader(stream, batch_size=2, num_workers=0))
    assert [key for batch in batches for key in batch["key"]] == SHARD_KEYS
    assert batches[0]["image"].shape == (2, 3, SIZE, SIZE)


def test_shards_split_across_workers_without_duplicates(shards: str) -> None:
    stream = WebDatasetImages(shards, SIZE, resampled=False, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        keys = [item["key"] for item in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(keys) == SHARD_KEYS
    assert stream.skipped == 0  # counts are per process: the worker that met s1_bad kept its own


# --- data with nothing usable: a bounded search, one InputError ----------------------------------------


def _latent_like_shard(path: Path) -> str:
    """A shard of what tools/encode_latents.py writes (no image in it)."""
    with wds.TarWriter(str(path)) as writer:
        for i in range(3):
            writer.write({"__key__": f"z{i}", "mean.npy": b"\x93NUMPY", "std.npy": b"\x93NUMPY", "txt": b"a caption"})
    return str(path)


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "one-pass"])
def test_garbage_shards_stop_after_a_bounded_search(tmp_path: Path, resampled: bool) -> None:
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    dataset = WebDatasetImages(str(tmp_path / "garbage.tar"), SIZE, resampled=resampled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as error:
            next(iter(dataset))  # resampled: endless draws of the one shard until the bound
    searched = f"{WebDatasetImages.max_barren} shard reads and skipped samples in 1 shard(s)" if resampled else \
        "a full pass over its 1 shard(s)"
    assert str(error.value) == (
        f"no usable sample in {tmp_path}/garbage.tar after {searched}: 1 skipped (e.g. {tmp_path}/garbage.tar: "
        "ReadError: invalid header); no shard held a sample webdataset can read: give .tar shards as "
        "tools/make_shards.py (images) or tools/encode_latents.py (latents) write them")
    assert not [w for w in caught if "skipping" in str(w.message)]  # summed up by the error, not warned per file


def test_the_hint_names_the_kind_of_shards_found(tmp_path: Path) -> None:
    latents = _latent_like_shard(tmp_path / "latents.tar")
    with pytest.raises(InputError, match=r"after 1000 shard reads and skipped samples in 1 shard\(s\): 3 skipped "
                                         r"\(e\.g\. .*latents\.tar:z\d: no image in sample.*\); these look like "
                                         r"latent shards from tools/encode_latents.py: pass them to "
                                         r"tools/train_ldm.py as --latents"):
        next(iter(WebDatasetImages(latents, SIZE)))
    with wds.TarWriter(str(tmp_path / "notes.tar")) as writer:
        writer.write({"__key__": "n0", "txt": b"only a caption", "json": b"{}"})
    with pytest.raises(InputError, match=r"each sample needs an image \(.jpg, .jpeg, .png or .webp\); these have "
                                         r"\.json, \.txt"):
        next(iter(WebDatasetImages(str(tmp_path / "notes.tar"), SIZE, resampled=False)))


def test_warnings_held_back_until_the_first_usable_sample_are_then_given(shards: str, tmp_path: Path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"x" * 3000)
    dataset = WebDatasetImages([str(tmp_path / "garbage.tar"), shards], SIZE, resampled=False, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning) as caught:
        keys = [item["key"] for item in dataset]
    assert keys == SHARD_KEYS and dataset.skipped == 2
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipping ")]
    assert [message.split(" (")[0].rsplit("/", 1)[-1] for message in skipped] == ["garbage.tar",
                                                                                   "shard-000001.tar:s1_bad"]


def test_loader_workers_raise_the_same_one_line_error(tmp_path: Path) -> None:
    latents = _latent_like_shard(tmp_path / "latents.tar")
    loader = DataLoader(WebDatasetImages(latents, SIZE), batch_size=2, num_workers=2)
    with pytest.raises(InputError) as error:
        endless_batches(loader)  # the first batch is read at once
    message = str(error.value)
    assert message.startswith(f"no usable sample in {latents} after 1000 shard reads") and "\n" not in message
    assert worker_error_message(ValueError("plain")) == "plain"


def test_a_pass_without_any_batch_is_an_error(tmp_path: Path) -> None:
    """One pass (resampled=False) split over 2 workers: the only shard is garbage, so no worker yields a batch."""
    (tmp_path / "garbage.tar").write_bytes(b"x" * 3000)
    loader = DataLoader(WebDatasetImages(str(tmp_path / "garbage.tar"), SIZE, resampled=False), batch_size=2,
                        num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(InputError, match=r"a full pass over .*garbage.tar gave process 0 no sample \(1 shards "
                                             r"split over 1 process\(es\) x 2 loader worker\(s\); skips counted in "
                                             r"the loader workers, whose warnings name them\): check the shards"):
            endless_batches(loader)


def test_one_wholly_corrupt_shard_among_good_ones_never_stops_the_stream(shards: str, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """The bound needs min(shards, max_barren_shards) different shards searched, not only many skips in one."""
    monkeypatch.setattr(WebDatasetImages, "max_barren", 5)  # 12 corrupt samples in a row are more than 5 skips
    with wds.TarWriter(str(tmp_path / "corrupt.tar")) as writer:
        for i in range(12):
            writer.write({"__key__": f"bad{i}", "png": b"not a png"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(8):  # draws with replacement: some start on the corrupt shard, even twice in a row
            mixed = WebDatasetImages([str(tmp_path / "corrupt.tar"), shards], SIZE, shuffle_buffer=0, seed=seed)
            assert len(list(itertools.islice(mixed, 10))) == 10
        (tmp_path / "corrupt2.tar").write_bytes((tmp_path / "corrupt.tar").read_bytes())
        with pytest.raises(InputError, match=r"after \d+ shard reads and skipped samples in 2 shard\(s\): \d+ skipped"):
            next(iter(WebDatasetImages(str(tmp_path / "corrupt{,2}.tar"), SIZE, shuffle_buffer=0)))  # all corrupt


# --- train_ldm's batches: flips ----------------------------------------------------------------------


@pytest.mark.parametrize("random_flip", [False, True])
def test_training_batches_flip_only_when_asked(tmp_path: Path, random_flip: bool) -> None:
    """train.random_flip (default off, as kohya's flip_aug and diffusers' --random_flip): a picture red on its left
    half and blue on its right never arrives mirrored by default; with the option about half the samples do."""
    from ldm.training.batches import training_batches
    from ldm.training.config import TrainConfig

    half = Image.new("RGB", (SIZE, SIZE), (255, 0, 0))
    half.paste((0, 0, 255), (SIZE // 2, 0, SIZE, SIZE))
    with wds.TarWriter(str(tmp_path / "000000.tar")) as writer:
        for k in range(8):
            writer.write({"__key__": f"{k:08d}", "png": _png_bytes(half), "txt": b"red left, blue right"})
    assert TrainConfig().random_flip is False
    cfg = TrainConfig.from_dict({"image_size": SIZE, "batch_size": 8, "num_workers": 0, "random_flip": random_flip})
    _, batches = training_batches(data=str(tmp_path / "000000.tar"), latents=None, cfg=cfg, rank=0, step=0,
                                  buckets=None, uncond={}, autoencoder=None)
    images = torch.cat([next(batches)["image"] for _ in range(8)])  # 64 samples
    mirrored = (images[:, 2, :, 0] > 0).all(1)  # blue on the left column
    assert (images[:, 0, :, 0] > 0).all(1).logical_xor(mirrored).all()  # each sample is one or the other
    share = mirrored.float().mean().item()
    assert share == 0.0 if not random_flip else 0.3 < share < 0.7
    with pytest.raises(InputError, match="random_flip is true or false"):
        TrainConfig.from_dict({"random_flip": "yes"})
