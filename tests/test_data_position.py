"""ldm/data/position.py: a stream of training batches resumed from its `state()` goes on bitwise as an
uninterrupted one (images, cached latents, buckets; one pass per epoch or resampled; 0 or 2 loader workers)."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.captions import WebDatasetCaptions
from ldm.data.images import WebDatasetImages, endless_batches
from ldm.training.batches import training_batches
from ldm.training.config import TrainConfig

SHARDS, PER_SHARD, BATCH, SEED = 4, 6, 4, 3
SHAPES = [(12, 8), (8, 12), (10, 10)]  # (width, height): wide, tall, square -> three buckets
BUCKETS = [(8, 12), (10, 10), (12, 8)]  # (height, width)
UNCOND = {"uncond_context": torch.zeros(3, 4)}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """4 image-caption shards of 6 noise images in three shapes (one unreadable sample, which still takes a
    position) and 4 latent shards of 6 samples with text contexts: {"images": pattern, "latents": pattern}."""
    root = tmp_path_factory.mktemp("position")
    rng = np.random.default_rng(0)
    for shard in range(SHARDS):
        with wds.TarWriter(str(root / f"img-{shard}.tar")) as images, \
                wds.TarWriter(str(root / f"lat-{shard}.tar")) as latents:
            for k in range(PER_SHARD):
                key, (width, height) = f"s{shard}_{k}", SHAPES[(shard + k) % 3]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                png = b"not a png" if (shard, k) == (2, 3) else _png(Image.fromarray(pixels))
                images.write({"__key__": key, "png": png, "txt": f"caption {key}"})
                latents.write({"__key__": key, "txt": f"caption {key}",
                               "mean.npy": _npy(rng.standard_normal((4, 2, 2)).astype(np.float16)),
                               "std.npy": _npy(rng.uniform(0.1, 1, (4, 2, 2)).astype(np.float16)),
                               "ctx.npy": _npy(rng.standard_normal((3, 4)).astype(np.float16))})
    return {"images": str(root / "img-{0..3}.tar"), "latents": str(root / "lat-{0..3}.tar")}


def stream(data: dict[str, str], kind: str, *, workers: int, resampled: bool, resume: dict | None = None,
           step: int = 0, **options):
    """training_batches' endless batches of `kind` ("images", "latents" or "buckets"), caption dropout, random
    crops and flips on."""
    cfg = TrainConfig.from_dict({"image_size": 8, "batch_size": BATCH, "num_workers": workers, "seed": SEED,
                                 "resampled": resampled, "shuffle_buffer": 5, "caption_dropout": 0.5,
                                 "random_crop": True, "random_flip": True, **options})
    latents = kind == "latents"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unreadable sample
        return training_batches(data=None if latents else data["images"], latents=data["latents"] if latents else None,
                                cfg=cfg, rank=0, step=step, buckets=BUCKETS if kind == "buckets" else None,
                                uncond=UNCOND if latents else {}, autoencoder=None, resume_state=resume)[1]


def take(batches, n: int) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [next(batches) for _ in range(n)]


def saved(batches) -> dict:
    """The state as a checkpoint keeps it: through JSON, so nothing but plain data survives."""
    return json.loads(json.dumps(batches.state()))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True], ids=["one-pass", "resampled"])
@pytest.mark.parametrize("kind", ["images", "latents", "buckets"])
def test_a_resumed_stream_goes_on_bitwise_as_an_uninterrupted_one(data, kind, resampled, workers):
    """Resumed three times (after 3, 6 and 11 batches: mid-epoch, at the end of a one-pass epoch, with the loader's
    round-robin mid-cycle), over epoch ends: the same keys, captions (some dropped) and tensors (random crops and
    flips) as one uninterrupted stream, and the same state at the end."""
    total, cuts = 16, (3, 6, 11)
    straight = stream(data, kind, workers=workers, resampled=resampled)
    expected = take(straight, total)
    got, state, done = [], None, 0
    for cut in (*cuts, total):
        resumed = stream(data, kind, workers=workers, resampled=resampled, resume=state)
        got += take(resumed, cut - done)
        state, done = saved(resumed), cut
    for a, b in zip(got, expected, strict=True):
        assert_same(a, b)
    assert state == saved(straight)
    assert any("" in batch["caption"] for batch in got) and any(c != "" for batch in got for c in batch["caption"])
    epochs = {at["epoch"] for at in state["workers"]} | {state["epoch"]}
    assert max(epochs) >= 1  # the stream went past an epoch's end


def test_skipped_samples_are_not_decoded(data, monkeypatch):
    """Resuming reads past the consumed samples without decoding them: the resumed stream decodes only the samples
    after the saved position (those of its first batch), not the dozens before it."""
    calls = []
    decode = WebDatasetCaptions._decode
    monkeypatch.setattr(WebDatasetCaptions, "_decode", lambda self, sample, rng: calls.append(1) or
                        decode(self, sample, rng))
    straight = stream(data, "images", workers=0, resampled=True)
    take(straight, 9)
    state = saved(straight)
    assert len(calls) >= 9 * BATCH  # the straight stream decoded every sample it handed out
    calls.clear()
    resumed = stream(data, "images", workers=0, resampled=True, resume=state)  # its first batch is fetched now
    before = state["workers"][0]
    take(resumed, 1)
    after = saved(resumed)["workers"][0]
    read = (after["epoch"] - before["epoch"]) * SHARDS * PER_SHARD + after["index"] - before["index"]
    assert len(calls) == read and BATCH <= read <= BATCH + 1  # + 1: the unreadable sample may be among them
    assert before["epoch"] * SHARDS * PER_SHARD + before["index"] >= 9 * BATCH  # all that was skipped undecoded
    assert_same(take(straight, 1)[0], take(stream(data, "images", workers=0, resampled=True, resume=state), 1)[0])


@pytest.mark.parametrize("resampled", [False, True], ids=["one-pass", "resampled"])
def test_the_state_names_the_shards_of_the_epoch_and_the_samples_consumed(data, resampled):
    batches = stream(data, "latents", workers=2, resampled=resampled)
    keys = [key for batch in take(batches, 3) for key in batch["key"]]
    state = saved(batches)
    assert (state["batches"], state["samples"], state["last_worker"]) == (3, 12, 0)  # workers 0, 1, 0
    assert (state["seed"], state["stream_seed"], state["world_size"], state["num_workers"]) == (SEED, SEED, 1, 2)
    shards = [at["shards"] for at in state["workers"]]
    assert [len(s) for s in shards] == [2, 2]  # resampled too: each worker's share of the 4 shards per epoch
    if not resampled:
        assert sorted(shards[0] + shards[1]) == sorted(data["latents"].replace("{0..3}", str(i)) for i in range(4))
    consumed = [at["samples_consumed"] for at in state["workers"]]
    assert consumed == [8, 4]
    for worker, start in ((0, 0), (1, 4), (0, 8)):  # batch i came from worker i % 2, from its own shards
        names = {Path(url).stem.replace("lat-", "s") for url in shards[worker]}
        assert {key.split("_")[0] for key in keys[start:start + 4]} <= names


def test_a_state_of_another_layout_falls_back_to_reseeding_in_one_line(data, capsys):
    """Another loader worker count, world size or data: one printed line, then today's reseeding by the step
    (seed + 1000 x step), never a crash; a checkpoint without a state reseeds too."""
    batches = stream(data, "latents", workers=0, resampled=True)
    take(batches, 3)
    state = saved(batches)
    fresh = take(stream(data, "latents", workers=0, resampled=True, seed=SEED + 1000 * 7), 2)
    capsys.readouterr()
    cases = [
        ({**state, "num_workers": 2}, "num_workers 2, now 0"),
        ({**state, "world_size": 2}, "world_size 2, now 1"),
        ({**state, "data": "0" * 16}, "data '0000000000000000', now"),
        ({**state, "workers": []}, "the saved data position is incomplete"),
        ({"what": "garbage"}, "of another version"),
        (None, "no data position was saved"),
    ]
    for resume, reason in cases:
        reseeded = take(stream(data, "latents", workers=0, resampled=True, resume=resume, step=7), 2)
        for a, b in zip(reseeded, fresh, strict=True):
            assert_same(a, b)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and lines[0].startswith("data position: ") and reason in lines[0], lines
        assert f"reseeded (seed {SEED + 7000})" in lines[0]
    take(stream(data, "latents", workers=0, resampled=True, resume=None, step=0), 1)
    assert capsys.readouterr().out == ""  # a fresh run says nothing


def test_each_pass_of_a_loader_with_workers_is_a_new_epoch(data):
    """endless_batches tells a shard stream each pass's epoch: with loader workers (new ones each pass) a one-pass
    stream is shuffled anew every pass, as without them."""
    dataset = WebDatasetImages(data["images"], 8, resampled=False, shuffle_buffer=5, seed=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batches = endless_batches(DataLoader(dataset, batch_size=None, num_workers=2))
        passes = [[next(batches)["key"] for _ in range(23)] for _ in range(2)]  # 23 readable samples a pass
    assert sorted(passes[0]) == sorted(passes[1]) and passes[0] != passes[1]
