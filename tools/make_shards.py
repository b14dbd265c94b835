#!/usr/bin/env python
"""Pack image-caption pairs into webdataset .tar shards for text-to-image training.

    python tools/make_shards.py photos/ 'shards/%06d.tar'                       # cat.png + cat.txt, ...
    python tools/make_shards.py captions.csv 'shards/%06d.tar' --resize 512 --center-crop
    python tools/make_shards.py captions.jsonl 'shards/%06d.tar' --shard-size 5000 --max-shard-bytes 1e9
    python tools/make_shards.py photos/ 'shards/%06d.tar' --shuffle                   # for training: mixed order

SRC is a folder (images found recursively, in sorted order, each captioned by the same-stem .txt beside
it), a .csv listing with a header naming `path` and `caption` columns, or a .jsonl listing of
{"path": ..., "caption": ...} lines (listings are read in their own order; relative paths resolve against
the listing's folder). An empty caption counts as missing. `--shuffle` writes the inputs in a seeded random
order instead (`--seed`): a training stream reads each shard front to back through a shuffle buffer much
smaller than the data, so shards of sorted inputs (a folder per class, a listing sorted by topic) give
batches of one class; bench/learning.py measured shapes sorted by class unlearnable that way.

Each sample is KEY.jpg or KEY.png, KEY.txt (the caption) and KEY.json ({"source", "original_size" [w, h],
"size" [w, h], "caption"}), KEY being the 8-digit sample number. Without --resize / --center-crop, JPEG
and PNG files are stored byte for byte (no second lossy encode); other formats, and every resized or
cropped image, are converted to RGB (transparency on white) and re-encoded: PNG input as PNG, everything
else as JPEG at --jpeg-quality. Sizes are upright (EXIF rotation applied).

Inputs that cannot be used (missing file, missing caption, unreadable caption, unreadable image) are
skipped and counted; a summary is printed and written to OUT_DIR/summary.json. The same inputs give the
same shards, byte for byte.

Each shard is written under a hidden temporary name and renamed once complete, so a shard file is always a
whole tar. A full disk removes the unfinished shard and writes no summary.json (the complete shards stay;
rerun with --overwrite once there is space).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from PIL import Image

from common.errors import InputError
from ldm.cli import HelpFormatter, check_output_folder, run_cli

if TYPE_CHECKING:  # torch, torchvision and webdataset load in the functions: --help answers without them
    from common.checkpoint import DiskFullError

SKIP_REASONS = ("missing file", "missing caption", "unreadable caption", "unreadable image")
MAX_EXAMPLES = 20  # skipped inputs named in summary.json; the counts are complete


@dataclass
class Item:
    """One input: its name in reports, the image file, and the caption (or the file holding it)."""

    source: str
    path: Path
    caption: str | None = None  # from a listing; None: absent
    caption_file: Path | None = None  # from a folder: the same-stem .txt, if there is one


class Skip(Exception):
    """An input that cannot be packed; args[0] is one of SKIP_REASONS."""


def folder_items(root: Path) -> list[Item]:
    """Every image under `root`, sorted, with its same-stem .txt caption file where one exists."""
    from ldm.data.images import list_images

    items = []
    for name in list_images(root):
        path = root / name
        caption_file = path.with_suffix(".txt")
        items.append(Item(name, path, caption_file=caption_file if caption_file.is_file() else None))
    if not items:
        raise InputError(f"no images found in {root} (looked for .png, .jpg, .jpeg, .webp, .bmp, .gif)")
    return items


def csv_items(listing: Path) -> list[Item]:
    """Rows of a CSV with a header naming `path` and `caption` columns (more columns are ignored)."""
    with open(listing, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not {"path", "caption"} <= set(columns):
            raise InputError(f"{listing} needs a header row with 'path' and 'caption' columns; its first row is "
                             f"{','.join(columns) or '(empty)'}")
        return [Item(row["path"] or "", _resolve(listing, row["path"] or ""), caption=row["caption"]) for row in reader]


def jsonl_items(listing: Path) -> list[Item]:
    """Lines of {"path": ..., "caption": ...}; blank lines are ignored, a malformed line is an error."""
    items = []
    with open(listing, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exn:
                raise InputError(f"{listing}:{number}: not JSON ({exn.msg}); each line must be "
                                 '{"path": ..., "caption": ...}') from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                raise InputError(f"{listing}:{number}: needs a string \"path\"; each line must be "
                                 '{"path": ..., "caption": ...}')
            caption = record.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise InputError(f"{listing}:{number}: \"caption\" must be a string, got {caption!r}")
            items.append(Item(record["path"], _resolve(listing, record["path"]), caption=caption))
    return items


def _resolve(listing: Path, path: str) -> Path:
    return Path(path) if os.path.isabs(path) else listing.parent / path


def read_items(src: Path) -> list[Item]:
    """SRC (a folder, .csv or .jsonl) -> the inputs, in order."""
    if src.is_dir():
        return folder_items(src)
    if not src.is_file():
        raise InputError(f"{src} does not exist; SRC is a folder of images with .txt captions, a .csv or a .jsonl")
    suffix = src.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise InputError(f"{src} is neither a folder nor a .csv or .jsonl listing of path and caption")
    items = csv_items(src) if suffix == ".csv" else jsonl_items(src)
    if not items:
        raise InputError(f"{src} lists no images")
    return items


def read_caption(item: Item, *, allow_empty: bool) -> str:
    """The item's caption, surrounding whitespace stripped; "" for a missing one only if `allow_empty`."""
    caption = item.caption
    if item.caption_file is not None:
        try:
            caption = item.caption_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exn:
            raise Skip("unreadable caption", str(exn)) from None
    caption = (caption or "").strip()
    if not caption and not allow_empty:
        raise Skip("missing caption", "no caption file or field, or an empty one (see --allow-empty-captions)")
    return caption


def encode_image(path: Path, *, resize: int | None, center_crop: bool, jpeg_quality: int) -> tuple[str, bytes, dict]:
    """(extension, image bytes, {"original_size", "size"}) for one image file; `Skip` if it cannot be decoded."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from ldm.data.images import open_image, to_rgb

    try:
        with Image.open(path) as probe:
            file_format = probe.format
        image = open_image(path)  # full decode: a truncated file fails here
    except Exception as exn:  # PIL raises many types on bad data
        raise Skip("unreadable image", f"{type(exn).__name__}: {exn}") from None
    original_size = list(image.size)
    if resize is None and not center_crop and file_format in ("JPEG", "PNG"):
        extension = "png" if file_format == "PNG" else "jpg"
        return extension, path.read_bytes(), {"original_size": original_size, "size": original_size}
    image = to_rgb(image)
    if resize is not None:
        image = TF.resize(image, resize, interpolation=InterpolationMode.BICUBIC, antialias=True)  # shorter side
    if center_crop:
        side = resize or min(image.size)
        image = TF.center_crop(image, [side, side])
    buffer = io.BytesIO()
    if file_format == "PNG":
        extension = "png"
        image.save(buffer, "PNG")
    else:
        extension = "jpg"
        image.save(buffer, "JPEG", quality=jpeg_quality)
    return extension, buffer.getvalue(), {"original_size": original_size, "size": list(image.size)}


class ShardFiles:
    """The files behind `wds.ShardWriter` (its `opener` and `post`): each shard is written as `.NAME.tmp`
    and renamed to NAME once complete (fsynced first), so NAME is never a partial tar."""

    def __init__(self) -> None:
        self.done: list[Path] = []
        self.current: tuple[Path, Path, _Sink] | None = None  # (shard, temporary file, what tarfile writes to)

    def open(self, name: str) -> _Sink:
        path = Path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        self.current = (path, tmp, _Sink(open(tmp, "wb")))
        return self.current[2]

    def finish(self, name: str) -> None:
        path, tmp, sink = self.current
        sink.file.flush()
        os.fsync(sink.file.fileno())
        sink.file.close()
        os.replace(tmp, path)
        self.current = None
        self.done.append(path)

    def written_bytes(self) -> int:
        """The bytes of the complete shards and the one being written."""
        partial = self.current[1].stat().st_size if self.current and self.current[1].exists() else 0
        return sum(p.stat().st_size for p in self.done) + partial

    def abort(self) -> Path | None:
        """Remove the shard being written (after a failure); -> its name, if there was one."""
        if self.current is None:
            return None
        path, tmp, sink = self.current
        self.current = None
        file, sink.file = sink.file, None
        try:
            file.close()  # may fail again flushing its buffer to a full disk
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        return path


class _Sink:
    """A shard's file as tarfile sees it. Once the shard is given up, what tarfile still flushes (when its
    stream is collected) goes nowhere instead of failing on the closed file."""

    def __init__(self, file: BinaryIO) -> None:
        self.file: BinaryIO | None = file

    def write(self, data: bytes) -> int:
        return self.file.write(data) if self.file is not None else len(data)


def disk_full(files: ShardFiles, out_dir: Path, processed: int, inputs: int) -> DiskFullError:
    """Remove the unfinished shard; -> the one-line error, the size of all shards estimated from the bytes
    written per input so far."""
    from common.checkpoint import DiskFullError

    needed = files.written_bytes() * inputs // max(processed, 1)
    path = files.abort() or out_dir
    kept = f"{len(files.done)} complete shards kept; " if files.done else ""
    rerun = "rerun with --overwrite" if files.done else "rerun"
    return DiskFullError(path, needed, f"free space or choose another output folder, then {rerun} "
                                       f"({kept}no partial shard or summary.json left)")


def shard_folder(pattern: str) -> Path:
    """The folder of a valid shard pattern, checked (before any input is read) to be one we can write in."""
    name = Path(pattern).name
    try:
        numbered = pattern % 0 != pattern % 1
    except (TypeError, ValueError):
        numbered = False
    if not numbered or "%" in str(Path(pattern).parent) or not name.endswith(".tar"):
        raise InputError(f"output pattern {pattern!r} must be a .tar file name with one %d-style shard number, "
                         "like shards/%06d.tar")
    out_dir = Path(pattern).parent
    check_output_folder(out_dir, flag="OUT_PATTERN", what="the shards")
    return out_dir


def prepare_output(pattern: str, *, overwrite: bool) -> Path:
    """Check the shard pattern, create its folder and clear (with `overwrite`) or refuse old shards; -> the folder."""
    out_dir, name = shard_folder(pattern), Path(pattern).name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise InputError(f"cannot create the output folder {out_dir}: {exn.strerror}") from None
    shard_name = re.compile(re.sub(r"%0?\d*d", r"\\d+", re.escape(name).replace(r"\%", "%")))
    old = sorted(p for p in out_dir.iterdir() if shard_name.fullmatch(p.name))
    if old and not overwrite:
        raise InputError(f"{out_dir} already holds shards matching {name} ({len(old)}, first: {old[0].name}); "
                         "choose an empty folder or pass --overwrite to replace them")
    for path in old:  # stale shards past the new count would otherwise be read with the new ones
        path.unlink()
    for path in out_dir.iterdir():  # unfinished shards of an interrupted run (see ShardFiles), never valid
        if path.name.startswith(".") and path.name.endswith(".tmp") and shard_name.fullmatch(path.name[1:-4]):
            path.unlink()
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", metavar="SRC", help="folder of images with same-stem .txt captions, or a .csv / .jsonl")
    p.add_argument("pattern", metavar="OUT_PATTERN", help="shard file names, like shards/%%06d.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-shard-bytes", type=float, default=None,
                   help="also start a new shard once one holds this many bytes (default: no limit)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="resize the shorter side to N pixels, bicubic (default: keep the size)")
    p.add_argument("--center-crop", action="store_true",
                   help="crop the middle N x N square (N: --resize, else the shorter side)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="for re-encoded JPEGs (default: 95)")
    p.add_argument("--allow-empty-captions", action="store_true",
                   help='pack images without a caption with caption "" instead of skipping them')
    p.add_argument("--overwrite", action="store_true", help="delete shards already matching OUT_PATTERN first")
    p.add_argument("--shuffle", action="store_true",
                   help="write the inputs in a seeded random order, not in their own (recommended for training)")
    p.add_argument("--seed", type=int, default=0, help="the --shuffle order's seed (default: 0)")
    args = p.parse_args()
    for flag, value, low, high in [("--shard-size", args.shard_size, 1, None), ("--resize", args.resize, 1, None),
                                   ("--max-shard-bytes", args.max_shard_bytes, 1, None),
                                   ("--jpeg-quality", args.jpeg_quality, 1, 100)]:
        if value is not None and (value < low or (high is not None and value > high)):
            raise InputError(f"{flag} must be {'between 1 and ' + str(high) if high else 'at least 1'}, got {value}")

    # torch, torchvision and webdataset load only now: --help and bad flags answer without them
    import webdataset as wds
    from tqdm import tqdm

    from common.checkpoint import is_disk_full, write_text_atomically

    shard_folder(args.pattern)  # a bad output location fails now, not after reading every input
    items = read_items(Path(args.src))
    if args.shuffle:
        random.Random(args.seed).shuffle(items)
    out_dir = prepare_output(args.pattern, overwrite=args.overwrite)

    skipped: Counter[str] = Counter({reason: 0 for reason in SKIP_REASONS})
    examples: list[dict[str, str]] = []
    files = ShardFiles()
    writer = None  # opened at the first good sample, so a run that packs nothing leaves no empty shard
    processed = 0
    try:
        for processed, item in enumerate(tqdm(items, desc="packing", unit="image"), 1):
            try:
                if not item.path.is_file():
                    raise Skip("missing file", f"{item.path} does not exist")
                caption = read_caption(item, allow_empty=args.allow_empty_captions)
                extension, data, sizes = encode_image(item.path, resize=args.resize, center_crop=args.center_crop,
                                                      jpeg_quality=args.jpeg_quality)
            except Skip as skip:
                skipped[skip.args[0]] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"source": item.source, "reason": skip.args[0], "detail": skip.args[1]})
                continue
            if writer is None:
                writer = wds.ShardWriter(args.pattern, maxcount=args.shard_size,
                                         maxsize=args.max_shard_bytes or float("inf"), opener=files.open,
                                         post=files.finish, verbose=0, mtime=0)  # mtime 0: reproducible tars
            metadata = {"source": item.source, **sizes, "caption": caption}
            writer.write({"__key__": f"{writer.total:08d}", extension: data, "txt": caption.encode("utf-8"),
                          "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8")})
        samples = writer.total if writer is not None else 0
        if writer is not None:
            writer.close()
    except BaseException as exc:  # a full disk, an interrupt, a bug: no partial shard stays behind
        if is_disk_full(exc):
            raise disk_full(files, out_dir, processed, len(items)) from None
        files.abort()
        raise
    shard_files = [str(p) for p in files.done]

    summary: dict[str, Any] = {
        "source": args.src, "pattern": args.pattern, "samples": samples, "shards": len(shard_files),
        "shard_files": [Path(f).name for f in shard_files], "skipped": dict(skipped),
        "skipped_examples": examples,
        "options": {"shard_size": args.shard_size, "max_shard_bytes": args.max_shard_bytes, "resize": args.resize,
                    "center_crop": args.center_crop, "allow_empty_captions": args.allow_empty_captions},
    }
    summary_path = out_dir / "summary.json"
    write_text_atomically(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    total_skipped = sum(skipped.values())
    print(f"wrote {samples} samples in {len(shard_files)} shards to {out_dir}")
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
    print(f"skipped {total_skipped} of {len(items)} inputs" + (f": {reasons}" if reasons else "") + f" ({summary_path})")
    if samples == 0:
        raise InputError(f"none of the {len(items)} inputs in {args.src} could be packed ({reasons}); see {summary_path}")


if __name__ == "__main__":
    run_cli(main)
