#!/usr/bin/env python
"""Emoji artwork with names -> webdataset shards of captioned images (the default model's data).

    python tools/prepare_emoji.py --fetch data/emoji                 # npm pack the three packages into data/emoji
    python tools/prepare_emoji.py --meta data/emoji/emoji-datasource-16.0.0.tgz \\
        --art data/emoji/emoji-datasource-twitter-16.0.0.tgz data/emoji/emoji-datasource-google-16.0.0.tgz \\
        --out 'data/emoji-shards/%06d.tar' --size 64

Sources (openly licensed; credit them where the data or weights go): `emoji-datasource` (MIT; names,
short names, categories in emoji.json), `emoji-datasource-twitter` (Twemoji artwork, CC-BY 4.0) and
`emoji-datasource-google` (Noto Emoji artwork, Apache 2.0), 64x64 PNGs in `img/<set>/64/`.
Captions come from the names: "red apple", "grinning face", "flag: Japan", "santa claus, dark skin
tone"; `--style-suffix` adds " in twitter style" / " in google style". Images are composited on
white and resized to `--size`. The shards are generated, never committed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image, UnidentifiedImageError

from common.errors import InputError
from ldm.cli import HelpFormatter, check_output_folder, run_cli

PACKAGES = ("emoji-datasource", "emoji-datasource-twitter", "emoji-datasource-google")
LICENSES = {"twitter": "Twemoji by Twitter, CC-BY 4.0", "google": "Noto Emoji by Google, Apache 2.0"}
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
T = TypeVar("T")


def caption_of(name: str, skin: str | None = None) -> str:
    """'RED APPLE' -> 'red apple'; 'Japan Flag' -> 'flag: Japan'; skin tones appended after a comma."""
    if name.endswith(" Flag") and name[:1].isupper() and not name.isupper():
        text = f"flag: {name[:-len(' Flag')]}"
    else:
        text = name.lower()
    if skin:
        tones = [SKIN_TONES[code] for code in skin.split("-") if code in SKIN_TONES]
        text += ", " + ", ".join(dict.fromkeys(tones))
    return text


def fetch(folder: Path) -> None:
    """`npm pack` the three packages into `folder` (needs npm and the npm registry)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["npm", "pack", *PACKAGES], cwd=folder, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise InputError("npm is not installed; install Node.js/npm or download the tarballs by hand") from None
    except subprocess.CalledProcessError as exc:
        raise InputError(f"npm pack failed: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}") from None
    print(f"fetched into {folder}: {', '.join(sorted(p.name for p in folder.glob('*.tgz')))}")


def read_member(archive: tarfile.TarFile, name: str) -> bytes | None:
    try:
        member = archive.extractfile(name)
    except KeyError:
        return None
    return member.read() if member is not None else None


def read_package(path: Path, read: Callable[[tarfile.TarFile], T]) -> T:
    """`read(archive)` on the npm tarball at `path`; a file that is not a whole .tgz is a one-line error."""
    try:
        with tarfile.open(path) as archive:
            return read(archive)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # only reading happens in here
        reason = (str(exc).splitlines() or [""])[0].rstrip(":") or type(exc).__name__
        if isinstance(exc, tarfile.ReadError) and reason == "file could not be opened successfully":
            reason = "not a .tgz or .tar archive"
        raise InputError(f"{path} cannot be read as a .tgz package ({reason}): give the npm tarball "
                         "(tools/prepare_emoji.py --fetch DIR downloads them)") from None


def emoji_entries(meta_tgz: Path) -> list[dict]:
    """The emoji of emoji-datasource's package/emoji.json (each with a name and an image), in sort order."""
    data = read_package(meta_tgz, lambda archive: read_member(archive, "package/emoji.json"))
    if data is None:
        raise InputError(f"{meta_tgz} has no package/emoji.json: is it the emoji-datasource package?")
    try:
        entries = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        reason = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise InputError(f"package/emoji.json in {meta_tgz} is not JSON ({reason}): is it the emoji-datasource "
                         "package?") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                and isinstance(e.get("image"), str) for e in entries):
        raise InputError(f"package/emoji.json in {meta_tgz} is not a list of emoji with a name and an image: is it "
                         "the emoji-datasource package?")
    return sorted(entries, key=lambda e: e.get("sort_order") if isinstance(e.get("sort_order"), int) else 0)


def art_set(art_tgz: Path) -> str:
    for name in read_package(art_tgz, lambda archive: archive.getnames()):
        parts = name.split("/")
        if len(parts) >= 4 and parts[1] == "img" and parts[3] == "64":
            return parts[2]
    raise InputError(f"{art_tgz} has no img/<set>/64/ images: is it an emoji-datasource-<set> package?")


def art_images(art_tgz: Path, style: str) -> dict[str, bytes]:
    """{file name: PNG bytes} of the package's 64 px images, in one pass (random access into a .tgz is slow)."""
    prefix = f"package/img/{style}/64/"
    return read_package(art_tgz, lambda archive: {m.name[len(prefix):]: archive.extractfile(m).read()
                                                  for m in archive if m.isfile() and m.name.startswith(prefix)})


def jobs_of(entries: list[dict], skin_tones: bool) -> list[tuple[str, str, dict, str | None]]:
    """(image file, caption, entry, skin tone code) of each emoji and, with `skin_tones`, each skin-tone variant."""
    jobs = []
    for e in entries:
        jobs.append((e["image"], caption_of(e["name"]), e, None))
        variations = e.get("skin_variations") if skin_tones else None
        for skin, variant in sorted(variations.items()) if isinstance(variations, dict) else ():
            if isinstance(variant, dict) and isinstance(variant.get("image"), str):
                jobs.append((variant["image"], caption_of(e["name"], skin), e, skin))
    return jobs


def is_held_out(key: str, fraction: float) -> bool:
    """A fixed, order-independent split: the key's hash decides, so every run holds out the same images."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 16**8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--fetch", default=None, help="only download the three npm tarballs into this folder")
    p.add_argument("--meta", help="emoji-datasource-*.tgz (emoji.json)")
    p.add_argument("--art", nargs="+", help="emoji-datasource-twitter-*.tgz and/or emoji-datasource-google-*.tgz")
    p.add_argument("--out", help="shard pattern with %%d, e.g. 'data/emoji-shards/%%06d.tar'")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--no-skin-tones", action="store_true", help="leave out the skin-tone variants")
    p.add_argument("--style-suffix", action="store_true", help="append ' in <set> style' to each caption")
    p.add_argument("--no-shuffle", action="store_true",
                   help="write in emoji-datasource's sort order, one art set after the other (default: a seeded "
                        "random order, so a training shuffle buffer sees every category)")
    p.add_argument("--seed", type=int, default=0, help="the order's seed (default: 0)")
    p.add_argument("--held-out", type=float, default=0.0,
                   help="fraction of the images written instead to held-out shards (OUT's folder, "
                        "held-out-%%06d.tar), chosen by a hash of the key, e.g. 0.01 for the autoencoder's PSNR/SSIM")
    args = p.parse_args()
    if args.fetch:
        check_output_folder(args.fetch, flag="--fetch", what="the npm tarballs")
        fetch(Path(args.fetch))
        return
    if not (args.meta and args.art and args.out):
        raise InputError("give --meta, --art and --out (or --fetch DIR to download the packages first)")
    if "%" not in args.out:
        raise InputError(f"--out {args.out!r} needs a %d field for the shard number, e.g. 'shards/%06d.tar'")
    if not 0 <= args.held_out < 1:
        raise InputError(f"--held-out must be a fraction in [0, 1), got {args.held_out}")
    if args.size < 8:
        raise InputError(f"--size must be >= 8, got {args.size}")
    out_dir = Path(args.out).parent
    check_output_folder(out_dir, flag="--out", what="the shards")  # before any package is read
    for path in [args.meta, *args.art]:
        if not Path(path).is_file():
            raise InputError(f"not found: {path}")
    # torch (ldm.images) and webdataset load only now: --help and bad flags answer without them
    import webdataset as wds
    from tqdm import tqdm

    from ldm.images import open_image, to_rgb

    entries = emoji_entries(Path(args.meta))
    arts = [(art, art_set(Path(art))) for art in args.art]  # each a package of artwork, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    written, held, missing, sets = 0, 0, 0, []
    undecodable, first_undecodable = 0, ""
    held_pattern = str(out_dir / "held-out-%06d.tar")
    jobs = jobs_of(entries, skin_tones=not args.no_skin_tones)
    images = {}
    for art, style in arts:
        sets.append(style)
        images[style] = art_images(Path(art), style)
    work = [(style, *job) for style in sets for job in jobs]
    if not args.no_shuffle:
        # Shards are written in a seeded random order: a training stream reads a shard front to back through a
        # shuffle buffer far smaller than the data, so sorted shards (faces, then flags; one art set, then the
        # other) would give batches of one category (the webdataset convention: shuffle before writing).
        random.Random(args.seed).shuffle(work)
    with wds.ShardWriter(args.out, maxcount=args.shard_size, verbose=0) as sink, \
            wds.ShardWriter(held_pattern, maxcount=args.shard_size, verbose=0) as held_sink:
        for style, image_name, caption, entry, skin in tqdm(work, desc="emoji", unit="img"):
            data = images[style].get(image_name)
            if data is None:
                missing += 1
                continue
            try:
                image = to_rgb(open_image(io.BytesIO(data)))  # transparency composited on white
            except Exception as exc:  # PIL raises many types on bad data: skip the image, count it
                undecodable += 1
                reason = "not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError) \
                    else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                first_undecodable = first_undecodable or f"{style}/{image_name} ({reason})"
                continue
            if image.size != (args.size, args.size):
                image = image.resize((args.size, args.size), Image.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            text = f"{caption} in {style} style" if args.style_suffix else caption
            key = f"{style}_{Path(image_name).stem}".replace(".", "_")
            held_out = is_held_out(key, args.held_out)
            held += held_out
            (held_sink if held_out else sink).write({"__key__": key, "png": buffer.getvalue(), "txt": text,
                        "json": json.dumps({"caption": text, "name": entry["name"],
                                            "short_names": entry.get("short_names"),
                                            "category": entry.get("category"),
                                            "subcategory": entry.get("subcategory"), "skin_tone": skin,
                                            "set": style, "license": LICENSES.get(style, "see package")})})
            written += not held_out
    if not held:
        for empty in out_dir.glob("held-out-*.tar"):
            empty.unlink()
    if not written + held:  # nothing usable: no empty shard left behind to train on
        Path(args.out % 0).unlink(missing_ok=True)
        raise InputError(f"no emoji image could be packed ({missing} missing in the art packages, {undecodable} "
                         f"undecodable{', e.g. ' + first_undecodable if undecodable else ''}): check --meta and --art")
    summary = {"samples": written, "held_out": held, "missing_images": missing, "undecodable_images": undecodable,
               "sets": sets, "size": args.size,
               "credits": [LICENSES.get(s, s) for s in sets] + ["emoji-datasource (MIT) for names and categories"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    held_note = f"; {held} held-out images in {held_pattern}" if held else ""
    print(f"wrote {written} captioned emoji to {args.out} ({', '.join(sets)}; {missing} images missing in the art "
          f"packages{held_note}); credits: {'; '.join(summary['credits'])}")
    if undecodable:
        print(f"skipped {undecodable} image{'s' if undecodable > 1 else ''} that could not be decoded, e.g. "
              f"{first_undecodable}")

if __name__ == "__main__":
    run_cli(main)
