"""tools/prepare_emoji.py on tarballs laid out like the emoji-datasource npm packages (made here, offline)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

from helpers import REPO

ENTRIES = [
    {"name": "RED APPLE", "image": "1f34e.png", "short_names": ["apple"], "category": "Food & Drink",
     "subcategory": "food-fruit", "sort_order": 2},
    {"name": "Japan Flag", "image": "1f1ef-1f1f5.png", "short_names": ["jp"], "category": "Flags",
     "subcategory": "country-flag", "sort_order": 3},
    {"name": "FATHER CHRISTMAS", "image": "1f385.png", "short_names": ["santa"], "category": "People & Body",
     "subcategory": "person-fantasy", "sort_order": 1,
     "skin_variations": {"1F3FF": {"image": "1f385-1f3ff.png"}}},
    {"name": "NOT IN THE ART", "image": "ffff.png", "sort_order": 4},
]


def _tgz(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _png(color) -> bytes:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent, with a coloured disc-ish square
    image.paste(Image.new("RGBA", (32, 32), color), (16, 16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepare_emoji_writes_captioned_shards(tmp_path):
    _tgz(tmp_path / "meta.tgz", {"package/emoji.json": json.dumps(ENTRIES).encode()})
    art = {f"package/img/twitter/64/{name}": _png(color) for name, color in
           [("1f34e.png", (220, 30, 30, 255)), ("1f1ef-1f1f5.png", (250, 250, 250, 255)),
            ("1f385.png", (200, 0, 0, 255)), ("1f385-1f3ff.png", (90, 50, 20, 255))]}
    _tgz(tmp_path / "twitter.tgz", art)
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "tools/prepare_emoji.py", "--meta", str(tmp_path / "meta.tgz"), "--art",
                             str(tmp_path / "twitter.tgz"), "--out", str(out / "%06d.tar"), "--size", "32",
                             "--style-suffix", "--no-shuffle"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    samples = list(wds.WebDataset(str(out / "000000.tar"), shardshuffle=False))
    captions = [s["txt"].decode() for s in samples]
    assert captions == ["father christmas in twitter style", "father christmas, dark skin tone in twitter style",
                        "red apple in twitter style", "flag: Japan in twitter style"]  # by sort_order
    apple = np.asarray(Image.open(io.BytesIO(samples[2]["png"])))
    assert apple.shape == (32, 32, 3)
    assert (apple[0, 0] == 255).all()  # transparency composited on white
    assert apple[16, 16, 0] > 200 and apple[16, 16, 1] < 60  # the red square
    meta = json.loads(samples[1]["json"])
    assert meta["skin_tone"] == "1F3FF" and meta["license"].startswith("Twemoji")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["missing_images"] == 1
    bad = subprocess.run([sys.executable, "tools/prepare_emoji.py", "--meta", str(tmp_path / "meta.tgz"), "--art",
                          str(tmp_path / "meta.tgz"), "--out", str(out / "x%06d.tar")], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "no img/<set>/64/" in bad.stderr and "Traceback" not in bad.stderr


def test_held_out_split_is_fixed_by_key_and_disjoint(tmp_path):
    _tgz(tmp_path / "meta.tgz", {"package/emoji.json": json.dumps(ENTRIES).encode()})
    art = {f"package/img/google/64/{name}": _png((10 * k, 0, 0, 255)) for k, name in
           enumerate(["1f34e.png", "1f1ef-1f1f5.png", "1f385.png", "1f385-1f3ff.png"])}
    _tgz(tmp_path / "google.tgz", art)

    def run(out, fraction):
        result = subprocess.run([sys.executable, "tools/prepare_emoji.py", "--meta", str(tmp_path / "meta.tgz"),
                                 "--art", str(tmp_path / "google.tgz"), "--out", str(out / "%06d.tar"), "--size", "16",
                                 "--held-out", str(fraction)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr
        def keys(pattern):
            return [s["__key__"] for f in sorted(out.glob(pattern)) for s in wds.WebDataset(str(f), shardshuffle=False)]
        return keys("0*.tar"), keys("held-out-*.tar"), json.loads((out / "summary.json").read_text())

    sys.path.insert(0, str(REPO / "tools"))
    from prepare_emoji import is_held_out
    keys = ["google_1f34e", "google_1f1ef-1f1f5", "google_1f385", "google_1f385-1f3ff"]
    fraction = 0.5
    train, held, summary = run(tmp_path / "a", fraction)
    assert sorted(train + held) == sorted(keys) and not set(train) & set(held)
    assert set(held) == {k for k in keys if is_held_out(k, fraction)}
    assert summary["held_out"] == len(held) and summary["samples"] == len(train)
    assert run(tmp_path / "b", fraction)[:2] == (train, held)  # the same split every run
    train0, held0, _ = run(tmp_path / "c", 0.0)
    assert held0 == [] and sorted(train0) == sorted(keys) and not list((tmp_path / "c").glob("held-out-*"))
    assert sum(is_held_out(f"k{i}", 0.01) for i in range(20000)) in range(150, 250)  # about 1%


def _prepare(tmp_path, meta, art, *extra):
    return subprocess.run([sys.executable, "tools/prepare_emoji.py", "--meta", str(meta), "--art", str(art), "--out",
                           str(tmp_path / "shards" / "%06d.tar"), "--size", "16", *extra], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    _tgz(tmp_path / "meta.tgz", {"package/emoji.json": json.dumps(ENTRIES).encode()})
    truncated = _png((10, 200, 10, 255))[:60]
    _tgz(tmp_path / "twitter.tgz", {"package/img/twitter/64/1f34e.png": _png((220, 30, 30, 255)),
                                    "package/img/twitter/64/1f1ef-1f1f5.png": b"not a png at all",
                                    "package/img/twitter/64/1f385.png": truncated,
                                    "package/img/twitter/64/1f385-1f3ff.png": _png((90, 50, 20, 255))})
    result = _prepare(tmp_path, tmp_path / "meta.tgz", tmp_path / "twitter.tgz", "--no-shuffle")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 images that could not be decoded, e.g. twitter/1f385.png" in result.stdout  # sort order
    summary = json.loads((tmp_path / "shards" / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["undecodable_images"] == 2 and summary["missing_images"] == 1
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False)]
    assert keys == ["twitter_1f385-1f3ff", "twitter_1f34e"]


def test_broken_packages_give_one_line_errors(tmp_path):
    """A file that is not a .tgz, a truncated .tgz, and an emoji.json that is not JSON: exit 2, one line each."""
    (tmp_path / "notes.tgz").write_text("just text, not an archive")
    _tgz(tmp_path / "bad-json.tgz", {"package/emoji.json": b'[{"name": "RED APPLE", "image": '})
    _tgz(tmp_path / "meta.tgz", {"package/emoji.json": json.dumps(ENTRIES).encode()})
    _tgz(tmp_path / "twitter.tgz", {f"package/img/twitter/64/{k}.png": _png((k, 0, 0, 255)) for k in range(40)})
    data = (tmp_path / "twitter.tgz").read_bytes()
    (tmp_path / "truncated.tgz").write_bytes(data[:len(data) // 2])
    cases = [("notes.tgz", "twitter.tgz",
              f"{tmp_path / 'notes.tgz'} cannot be read as a .tgz package (not a .tgz or .tar archive)"),
             ("bad-json.tgz", "twitter.tgz", f"package/emoji.json in {tmp_path / 'bad-json.tgz'} is not JSON ("),
             ("meta.tgz", "truncated.tgz", f"{tmp_path / 'truncated.tgz'} cannot be read as a .tgz package")]
    runs = [subprocess.Popen([sys.executable, "tools/prepare_emoji.py", "--meta", str(tmp_path / meta), "--art",
                              str(tmp_path / art), "--out", str(tmp_path / name / "%06d.tar")], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, (meta, art, _) in
            zip("abc", cases)]
    for run, (_, _, message) in zip(runs, cases):
        _, stderr = run.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and "Traceback" not in stderr, stderr
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), stderr


def test_shards_are_written_in_a_seeded_random_order_across_art_sets(tmp_path):
    """By default the images of both art sets are interleaved in a seeded random order (a training shuffle buffer
    reads shards front to back: sorted shards give batches of one category); --no-shuffle keeps the sort order."""
    _tgz(tmp_path / "meta.tgz", {"package/emoji.json": json.dumps(ENTRIES).encode()})
    names = ["1f34e.png", "1f1ef-1f1f5.png", "1f385.png", "1f385-1f3ff.png"]
    for style in ("twitter", "google"):
        _tgz(tmp_path / f"{style}.tgz", {f"package/img/{style}/64/{n}": _png((20 * k, 0, 0, 255))
                                         for k, n in enumerate(names)})

    def keys(name, *extra):
        out = tmp_path / name
        result = subprocess.run([sys.executable, "tools/prepare_emoji.py", "--meta", str(tmp_path / "meta.tgz"),
                                 "--art", str(tmp_path / "twitter.tgz"), str(tmp_path / "google.tgz"), "--out",
                                 str(out / "%06d.tar"), "--size", "16", "--shard-size", "3", *extra],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr
        return [s["__key__"] for f in sorted(out.glob("0*.tar")) for s in wds.WebDataset(str(f), shardshuffle=False)]

    stems = ["1f385", "1f385-1f3ff", "1f34e", "1f1ef-1f1f5"]  # sort_order, skin tone after its emoji
    in_order = [f"{style}_{stem}" for style in ("twitter", "google") for stem in stems]
    assert keys("sorted", "--no-shuffle") == in_order
    import random
    jobs = [f"{style}_{stem}" for style in ("twitter", "google") for stem in [*stems, "ffff"]]  # ffff: not in the art
    random.Random(0).shuffle(jobs)
    expected = [key for key in jobs if not key.endswith("ffff")]
    shuffled = keys("shuffled")
    assert shuffled == expected != in_order
    assert keys("again") == shuffled  # the same order every run
    other = keys("seed-1", "--seed", "1")
    assert sorted(other) == sorted(in_order) and other != shuffled
