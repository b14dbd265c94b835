"""tools/make_shards.py and ldm.caption_data: packing image-caption pairs into shards and reading them back."""
from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
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
from ldm.cli import run_cli
from ldm.data.captions import WebDatasetCaptions, caption_dataset, collate_latents, latent_dataset

from helpers import REPO, write_real_images

SCRIPT = REPO / "tools" / "make_shards.py"
SIZE = 16
# the folder fixture, in the sorted order make_shards reads it; broken.png and img_0005.png are skipped
CAPTIONS = {"img_0000.png": "a photo 0", "img_0001.png": "a photo 1", "img_0002.png": "a photo 2",
            "img_0003.png": "a photo 3", "img_0004.png": "a photo 4", "nested/wide.jpg": "a wide photo"}


def _load_make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_shards"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_shards = _load_make_shards()


def run_in_process(*args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """make_shards' main under `run_cli`, as the script runs it, without paying for a new Python (~5 s)."""
    monkeypatch.setattr(sys, "argv", ["make_shards.py", *map(str, args)])
    try:
        run_cli(make_shards.main)
    except SystemExit as exit_:
        return exit_.code
    return 0


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of one tar, in the file's order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Five captioned 32x32 photos, one without a caption, an unreadable one with a caption, a nested 40x24 JPEG."""
    root = tmp_path_factory.mktemp("source")
    for path in write_real_images(root, 6):
        if path.name in CAPTIONS:
            path.with_suffix(".txt").write_text(f"  {CAPTIONS[path.name]}\n")  # outer whitespace is stripped
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("never read")
    (root / "nested").mkdir()
    Image.open(root / "img_0000.png").resize((40, 24)).save(root / "nested" / "wide.jpg", quality=90)
    (root / "nested" / "wide.txt").write_text(CAPTIONS["nested/wide.jpg"])
    return root


@pytest.fixture(scope="module")
def packed(source: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder packed by the script itself, 4 samples per shard."""
    out = tmp_path_factory.mktemp("packed")
    result = subprocess.run([sys.executable, str(SCRIPT), str(source), str(out / "%06d.tar"), "--shard-size", "4"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    return out, result


# --- make_shards -------------------------------------------------------------------------------------


def test_folder_is_packed_in_sorted_order(source: Path, packed) -> None:
    out, result = packed
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "summary.json"]
    shards = [read_shard(out / "000000.tar"), read_shard(out / "000001.tar")]
    assert [len(shard) for shard in shards] == [4, 2]
    samples = {**shards[0], **shards[1]}
    assert list(samples) == [f"{i:08d}" for i in range(6)]
    metadata = [json.loads(sample["json"]) for sample in samples.values()]
    assert [m["source"] for m in metadata] == list(CAPTIONS)
    assert [sample["txt"].decode() for sample in samples.values()] == list(CAPTIONS.values())
    assert [m["caption"] for m in metadata] == list(CAPTIONS.values())
    assert metadata[0]["original_size"] == metadata[0]["size"] == [32, 32]
    assert metadata[-1]["original_size"] == [40, 24]
    # no resizing asked for: PNG and JPEG files are stored byte for byte, under their own extension
    assert set(samples["00000000"]) == {"png", "txt", "json"}
    assert samples["00000000"]["png"] == (source / "img_0000.png").read_bytes()
    assert samples["00000005"]["jpg"] == (source / "nested" / "wide.jpg").read_bytes()


def test_summary_counts_what_was_written_and_skipped(packed) -> None:
    out, result = packed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["shards"] == 2
    assert summary["shard_files"] == ["000000.tar", "000001.tar"]
    assert summary["skipped"] == {"missing file": 0, "missing caption": 1, "unreadable caption": 0,
                                  "unreadable image": 1}
    assert [(e["source"], e["reason"]) for e in summary["skipped_examples"]] == [
        ("broken.png", "unreadable image"), ("img_0005.png", "missing caption")]
    assert "wrote 6 samples in 2 shards" in result.stdout
    assert "skipped 2 of 8 inputs: 1 missing caption, 1 unreadable image" in result.stdout


def test_output_is_deterministic(source: Path, packed, tmp_path: Path, monkeypatch) -> None:
    out, _ = packed
    assert run_in_process(source, tmp_path / "%06d.tar", "--shard-size", "4", monkeypatch=monkeypatch) == 0
    for name in ("000000.tar", "000001.tar"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (out, tmp_path)]
    assert [{**summary, "pattern": None} for summary in summaries] == [{**summaries[0], "pattern": None}] * 2


def test_shuffle_writes_a_seeded_permutation(source: Path, packed, tmp_path: Path, monkeypatch) -> None:
    """--shuffle: the same samples in a seeded random order (keys renumbered in the new order), reproducible."""
    import random

    out, _ = packed
    sorted_samples = {**read_shard(out / "000000.tar"), **read_shard(out / "000001.tar")}
    by_source = {json.loads(s["json"])["source"]: s for s in sorted_samples.values()}

    def pack(name, *extra):
        folder = tmp_path / name
        assert run_in_process(source, folder / "%06d.tar", "--shard-size", "4", "--shuffle", *extra,
                              monkeypatch=monkeypatch) == 0
        return {**read_shard(folder / "000000.tar"), **read_shard(folder / "000001.tar")}

    shuffled = pack("a")
    assert list(shuffled) == [f"{i:08d}" for i in range(6)]
    sources = [json.loads(s["json"])["source"] for s in shuffled.values()]
    # the inputs (broken.png and the uncaptioned img_0005.png among them) are shuffled before packing
    inputs = sorted(["broken.png", *CAPTIONS, "img_0005.png"])
    random.Random(0).shuffle(inputs)
    assert sources == [s for s in inputs if s in CAPTIONS] != list(CAPTIONS)
    for sample in shuffled.values():
        original = by_source[json.loads(sample["json"])["source"]]
        assert {k: v for k, v in sample.items() if k != "json"} == {k: v for k, v in original.items() if k != "json"}
    assert pack("b") == shuffled
    assert [json.loads(s["json"])["source"] for s in pack("c", "--seed", "1").values()] != sources


def test_csv_listing_with_resize_and_center_crop(source: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "one.png").write_bytes((source / "img_0001.png").read_bytes())
    listing = tmp_path / "lists" / "captions.csv"
    listing.parent.mkdir()
    listing.write_text("path,caption,extra\n"
                       '../images/one.png,"one, with a comma",x\n'  # relative to the listing's folder
                       f"{source / 'nested' / 'wide.jpg'},wide,y\n"
                       "missing.png,gone,z\n")
    out = tmp_path / "out"
    assert run_in_process(listing, out / "s-%d.tar", "--resize", "12", "--center-crop", monkeypatch=monkeypatch) == 0
    samples = read_shard(out / "s-0.tar")
    metadata = [json.loads(sample["json"]) for sample in samples.values()]
    assert [m["caption"] for m in metadata] == ["one, with a comma", "wide"]
    assert [m["source"] for m in metadata] == ["../images/one.png", str(source / "nested" / "wide.jpg")]
    assert [m["original_size"] for m in metadata] == [[32, 32], [40, 24]]
    for sample, extension in zip(samples.values(), ["png", "jpg"]):  # PNG stays PNG, the rest is JPEG
        assert Image.open(io.BytesIO(sample[extension])).size == (12, 12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["skipped"]["missing file"] == 1
    assert summary["skipped_examples"][0]["source"] == "missing.png"


def test_jsonl_listing_with_resize_and_empty_captions(source: Path, tmp_path: Path, monkeypatch) -> None:
    listing = tmp_path / "captions.jsonl"
    lines = [{"path": str(source / "nested" / "wide.jpg"), "caption": "wide"},
             {"path": str(source / "img_0002.png")},  # no caption: kept as "" with --allow-empty-captions
             {"path": str(source / "broken.png"), "caption": "broken"}]
    listing.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out"
    assert run_in_process(listing, out / "%03d.tar", "--resize", "12", "--allow-empty-captions",
                          monkeypatch=monkeypatch) == 0
    samples = list(read_shard(out / "000.tar").values())
    assert [sample["txt"] for sample in samples] == [b"wide", b""]
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (20, 12)  # shorter side 24 -> 12, bicubic
    assert json.loads(samples[0]["json"])["size"] == [20, 12]
    assert json.loads((out / "summary.json").read_text())["skipped"]["unreadable image"] == 1


def test_max_shard_bytes_starts_new_shards(source: Path, tmp_path: Path, monkeypatch) -> None:
    # every sample is over 1000 bytes, so each shard holds one (the limit is checked before each write)
    assert run_in_process(source, tmp_path / "%02d.tar", "--max-shard-bytes", "1000", monkeypatch=monkeypatch) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["shards"] == 6


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    listing = tmp_path / "no_header.csv"
    listing.write_text("img.png,a caption\n")
    result = subprocess.run([sys.executable, str(SCRIPT), str(listing), str(tmp_path / "%06d.tar")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {listing} needs a header row with 'path' and 'caption' columns; its first row is img.png,a caption"]


@pytest.mark.parametrize("case, message", [
    ("missing source", "does not exist"),
    ("empty folder", "no images found in"),
    ("csv without columns", "needs a header row with 'path' and 'caption'"),
    ("bad jsonl line", "captions.jsonl:2: not JSON"),
    ("pattern without %d", "must be a .tar file name with one %d-style shard number"),
    ("existing shards", "already holds shards matching %06d.tar (1, first: 000000.tar)"),
    ("nothing packable", "none of the 1 inputs"),
    ("bad shard size", "--shard-size must be at least 1, got 0"),
])
def test_bad_inputs(case: str, message: str, source: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    src, pattern, extra = source, tmp_path / "out" / "%06d.tar", []
    if case == "missing source":
        src = tmp_path / "nope"
    elif case == "empty folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "csv without columns":
        src = tmp_path / "list.csv"
        src.write_text("file,text\na.png,a\n")
    elif case == "bad jsonl line":
        src = tmp_path / "captions.jsonl"
        src.write_text('{"path": "a.png", "caption": "a"}\n{"path": \n')
    elif case == "pattern without %d":
        pattern = tmp_path / "out" / "shard.tar"
    elif case == "existing shards":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "000000.tar").write_bytes(b"")
    elif case == "nothing packable":
        src = tmp_path / "one"
        src.mkdir()
        (src / "lonely.png").write_bytes((source / "img_0005.png").read_bytes())  # no caption
    elif case == "bad shard size":
        extra = ["--shard-size", "0"]
    assert run_in_process(src, pattern, *extra, monkeypatch=monkeypatch) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_overwrite_replaces_only_matching_shards(source: Path, tmp_path: Path, monkeypatch) -> None:
    for name in ("000007.tar", "keep.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"old")
    assert run_in_process(source, tmp_path / "%06d.tar", "--overwrite", monkeypatch=monkeypatch) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "keep.tar", "notes.txt", "summary.json"]


# --- caption_dataset ----------------------------------------------------------------------------------


def _read(dataset, n: int | None = None) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(itertools.islice(dataset, n))


def test_caption_dataset_yields_images_with_their_captions(packed) -> None:
    out, _ = packed
    dataset = caption_dataset(str(out / "{000000..000001}.tar"), SIZE, caption_dropout=0.0, resampled=False,
                              shuffle_buffer=0)
    items = _read(dataset)
    assert [item["caption"] for item in items] == list(CAPTIONS.values())
    assert [item["key"] for item in items] == [f"{i:08d}" for i in range(6)]
    for item in items:
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert dataset.skipped == 0
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["caption"] == list(CAPTIONS.values())[:4]


def test_caption_dropout_rate_and_reproducibility(packed) -> None:
    out, _ = packed
    urls = str(out / "{000000..000001}.tar")

    def captions(p: float, seed: int = 0, n: int = 1000) -> list[str]:
        return [item["caption"] for item in _read(caption_dataset(urls, 8, caption_dropout=p, seed=seed), n)]

    dropped = captions(0.3)
    rate = dropped.count("") / len(dropped)
    assert abs(rate - 0.3) < 0.05  # 1000 draws: the standard deviation of the rate is 0.0145
    assert captions(0.3, n=200) == dropped[:200]  # the same seed drops the same captions
    assert captions(0.3, seed=1, n=200) != dropped[:200]
    assert "" not in captions(0.0, n=100)
    assert set(captions(1.0, n=100)) == {""}
    with pytest.raises(InputError, match="between 0 and 1"):
        caption_dataset(urls, 8, caption_dropout=1.5)


def test_corrupt_shards_and_samples_are_skipped_and_counted(packed, tmp_path: Path) -> None:
    out, _ = packed
    good_jpeg = read_shard(out / "000001.tar")["00000005"]["jpg"]
    with wds.TarWriter(str(tmp_path / "extra-0.tar")) as writer:
        writer.write({"__key__": "garbage", "jpg": b"\xff\xd8 not a jpeg", "txt": b"bad image"})
        writer.write({"__key__": "silent", "jpg": good_jpeg})  # no caption at all
        writer.write({"__key__": "json_only", "jpg": good_jpeg, "json": json.dumps({"caption": "from json"}).encode()})
    (tmp_path / "extra-1.tar").write_bytes(os.urandom(3000))  # not a tar file
    dataset = WebDatasetCaptions([str(out / "000001.tar"), str(tmp_path / "extra-{0..1}.tar")], SIZE,
                                 caption_dropout=0.0, resampled=False, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning) as caught:
        items = list(dataset)
    assert [item["caption"] for item in items] == ["a photo 4", "a wide photo", "from json"]
    assert dataset.skipped == 3
    assert [name.rsplit("/", 1)[-1] for name, _ in dataset.skip_report.examples] == [
        "extra-0.tar:garbage", "extra-0.tar:silent", "extra-1.tar"]
    assert sum(str(w.message).startswith("skipping ") for w in caught) == 3  # one warning each


def test_shards_are_split_between_ranks(packed, monkeypatch) -> None:
    # webdataset 1.0.2 reads RANK and WORLD_SIZE from the environment before asking torch.distributed
    out, _ = packed
    urls = str(out / "{000000..000001}.tar")
    keys = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = caption_dataset(urls, 8, resampled=False, shuffle_buffer=10, seed=3)
        keys[rank] = {item["key"] for item in _read(dataset)}
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {f"{i:08d}" for i in range(6)}
    # resampled: each rank draws its own shards and samples, nothing is split
    streams = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        streams[rank] = [item["key"] for item in _read(caption_dataset(urls, 8, seed=3), 30)]
    assert streams[0] != streams[1]


# --- latent_dataset -----------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_latent_shards_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    means = [rng.standard_normal((4, 3, 3)).astype(np.float16) for _ in range(3)]
    stds = [rng.uniform(0.1, 1, (4, 3, 3)).astype(np.float16) for _ in range(3)]
    contexts = [rng.standard_normal((77, 8)).astype(np.float16) for _ in range(3)]
    with wds.TarWriter(str(tmp_path / "latents-0.tar")) as writer:
        for i in range(3):
            sample = {"__key__": f"k{i}", "mean.npy": _npy(means[i]), "std.npy": _npy(stds[i]), "txt": f"cap {i}"}
            if i < 2:  # the last sample has no text context: kept, with context None
                sample["ctx.npy"] = _npy(contexts[i])
            writer.write(sample)
        writer.write({"__key__": "no_std", "mean.npy": _npy(means[0]), "ctx.npy": _npy(contexts[0]), "txt": "x"})
    urls = str(tmp_path / "latents-0.tar")
    dataset = latent_dataset(urls, caption_dropout=0.0, resampled=False, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match="no_std"):
        items = list(dataset)
    assert dataset.skipped == 1 and [item["key"] for item in items] == ["k0", "k1", "k2"]
    for i, item in enumerate(items):
        assert item["mean"].dtype == torch.float32 and item["caption"] == f"cap {i}"
        assert torch.equal(item["mean"], torch.from_numpy(means[i]).float())
        assert torch.equal(item["std"], torch.from_numpy(stds[i]).float())
    assert torch.equal(items[0]["context"], torch.from_numpy(contexts[0]).float()) and items[2]["context"] is None

    dropped = _read(latent_dataset(urls, caption_dropout=1.0, resampled=False, shuffle_buffer=0))
    assert all(item["caption"] == "" and item["context"] is None for item in dropped)

    uncond = torch.full((77, 8), 0.5)
    batch = collate_latents([items[0], dropped[1]], uncond_context=uncond)
    assert batch["mean"].shape == (2, 4, 3, 3) and batch["caption"] == ["cap 0", ""]
    assert torch.equal(batch["context"][0], items[0]["context"]) and torch.equal(batch["context"][1], uncond)
    assert collate_latents([items[2]])["context"] is None  # no contexts at all: the trainer encodes captions
    with pytest.raises(ValueError, match="pass uncond_context"):
        collate_latents([items[0], dropped[1]])
    with pytest.raises(ValueError, match="has a caption but no ctx.npy"):
        collate_latents([items[0], items[2]], uncond_context=uncond)


A = {"sha256": "a" * 64, "scale_factor": 0.5, "checkpoint": "runs/ae-a/autoencoder.safetensors"}
B = {"sha256": "b" * 64, "scale_factor": 0.5, "checkpoint": "runs/ae-b/autoencoder.safetensors"}


def _latent_shard(path: Path, record: dict | None, n: int = 3) -> str:
    """`n` latent samples as tools/encode_latents.py writes them, recording `record` (None: an older version)."""
    with wds.TarWriter(str(path)) as writer:
        for i in range(n):
            sample = {"__key__": f"k{i}", "mean.npy": _npy(np.zeros((4, 2, 2), np.float16)),
                      "std.npy": _npy(np.ones((4, 2, 2), np.float16)), "txt": f"cap {i}"}
            if record is not None:
                sample["autoencoder.json"] = json.dumps(record).encode()
            writer.write(sample)
    return str(path)


def test_latent_shards_are_read_only_by_the_autoencoder_that_made_them(tmp_path: Path) -> None:
    urls = _latent_shard(tmp_path / "a.tar", A)
    dataset = latent_dataset(urls, caption_dropout=0.0, resampled=False, shuffle_buffer=0, autoencoder=A)
    assert [item["key"] for item in dataset] == ["k0", "k1", "k2"] and dataset.autoencoder_record == A
    with pytest.raises(InputError) as error:
        next(iter(latent_dataset(urls, autoencoder=B)))
    assert str(error.value) == (
        f"{urls} holds latents of autoencoder aaaaaaaaaaaa (runs/ae-a/autoencoder.safetensors, scale_factor 0.5), "
        "but this model's autoencoder is bbbbbbbbbbbb (runs/ae-b/autoencoder.safetensors, scale_factor 0.5): pass "
        "model.autoencoder_ckpt=runs/ae-a/autoencoder.safetensors (the one tools/encode_latents.py used), or "
        "re-encode the shards with this model's autoencoder")
    # Only the weights decide: the shards hold the unscaled posterior, so the model's scale_factor applies.
    with pytest.warns(RuntimeWarning, match="scale_factor was 0.5; this model's, 0.18215, applies"):
        assert len(list(latent_dataset(urls, resampled=False, autoencoder={**A, "scale_factor": 0.18215}))) == 3
    assert len(_read(latent_dataset(urls, resampled=False))) == 3  # no expectation: no check


def test_latent_shards_without_a_record_are_refused_with_the_re_encoding_command(tmp_path: Path) -> None:
    urls = _latent_shard(tmp_path / "old.tar", None)
    with pytest.raises(InputError, match=r"latent sample .*old.tar:k\d does not record the autoencoder that made it "
                                         r"\(no autoencoder.json: an older tools/encode_latents.py wrote it\); "
                                         r"re-encode the image shards: python tools/encode_latents.py --config CONFIG "
                                         r"--data IMAGE_SHARDS --out 'latents/%06d.tar' model.autoencoder_ckpt="):
        next(iter(latent_dataset(urls, autoencoder=A)))
    assert len(_read(latent_dataset(urls, resampled=False))) == 3


def test_image_shards_read_as_latents_stop_with_a_hint(packed) -> None:
    out, _ = packed
    with pytest.raises(InputError, match=r"no usable sample in .*\{000000..000001\}.tar after 1000 shard reads and "
                                         r"skipped samples in 2 shard\(s\): 6 skipped .*KeyError: mean.npy\); these "
                                         r"look like image shards: pass them as --data, not --latents"):
        next(iter(latent_dataset(str(out / "{000000..000001}.tar"))))
