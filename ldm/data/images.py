"""Training images: a folder of images or webdataset shards -> {"image": (3, H, W) in [-1, 1], "key": str}.

Sources yield dicts so later stages can add keys (captions and cached latents: `ldm.data.captions`).
Unreadable images never stop a run: they are skipped, warned about once and counted in a `SkipReport`, per
process: each DataLoader worker counts in its own copy of the dataset, unseen by the main process. To find
every bad file up front, call `ImageFolder.verify()` in the main process. Data with nothing usable at all
does stop a run, with one InputError after a bounded search (`ShardStream.max_barren`, `endless_batches`).
Shard streams are read in numbered epochs and each sample draws from its own generator, so a stream can resume
at any sample without decoding the ones before (`ShardStream.positioned`, `ldm.data.position`).
"""
from __future__ import annotations

import copy
import functools
import io
import itertools
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset
from torchvision.transforms import InterpolationMode, RandomCrop
from torchvision.transforms import functional as TF
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from common.errors import InputError
from ldm.data.position import endless_batches as endless_batches  # re-exported: their home before
from ldm.data.position import worker_error_message as worker_error_message
from ldm.images import open_image, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # webdataset keys are extensions, lower-cased
DATA_HINT = "point --data at a folder of images or at webdataset shards like 'shards/{000000..000009}.tar'"
# Where only shards are read (train_ldm, encode_latents, eval_text_to_image): no folder of images there.
SHARD_HINT = ("point --data at webdataset shards like 'shards/{000000..000009}.tar' (tools/make_shards.py packs a "
              "folder of images into shards)")


@dataclass
class SkipReport:
    """Unreadable images skipped in this process: how many, and the first `max_examples` (name, reason).
    `len(report)` is the count (an empty report is falsy); `report[i]` is the i-th kept (name, reason)."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 20
    _seen: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    # While held (a list): warnings wait there and `barren` counts every skip, repeats included.
    _held: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    barren: int = field(default=0, init=False, repr=False, compare=False)

    def add(self, name: str, reason: str | BaseException) -> None:
        """Count `name` and warn about it, once however often it is met again."""
        if self._held is not None:
            self.barren += 1
        if name in self._seen:
            return
        if isinstance(reason, BaseException):
            reason = f"{type(reason).__name__}: {reason.args[0] if reason.args else ''}"
        self._seen.add(name)
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((name, reason))
        message = f"skipping {name} (unreadable): {reason}"
        if self._held is not None:
            self._held.append(message)
        else:
            warnings.warn(message, RuntimeWarning)

    def hold(self) -> None:
        """Hold the warnings back (until `release`) and count the skips in `barren` from 0: a stream does this
        until its first usable sample, so data with none at all gives one error instead of a warning per file."""
        self._held, self.barren = [], 0

    @property
    def holding(self) -> bool:
        return self._held is not None

    def count_search(self) -> None:
        """One more step (a shard read) of the search while held."""
        if self._held is not None:
            self.barren += 1

    def release(self, *, warn: bool = True) -> None:
        """Stop holding; the held warnings are given now (or dropped, warn=False: an error summarises them)."""
        held, self._held = self._held or [], None
        for message in held if warn else ():
            warnings.warn(message, RuntimeWarning)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.examples[i]


def _transform(image: Image.Image, *, size: int, random_crop: bool, random_flip: bool,
               rng: random.Random | None = None) -> torch.Tensor:
    image = to_rgb(image)
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)  # shorter side
    if random_crop and rng is not None:
        image = TF.crop(image, rng.randint(0, image.height - size), rng.randint(0, image.width - size), size, size)
    elif random_crop:
        image = TF.crop(image, *RandomCrop.get_params(image, (size, size)))
    else:
        image = TF.center_crop(image, [size, size])
    if random_flip and (rng.random() if rng is not None else torch.rand(())) < 0.5:
        image = TF.hflip(image)
    return TF.pil_to_tensor(image).float().div(127.5).sub(1.0)


def image_transform(size: int, *, random_crop: bool, random_flip: bool) -> Callable[..., torch.Tensor]:
    """PIL image (, rng=random.Random) -> float32 (3, size, size) in [-1, 1]: RGB (transparency on white), shorter
    side to `size` (bicubic, antialiased), center or random square crop, optional horizontal flip. Random draws
    use `rng` where given (a shard sample's own), else torch's global generator, which the DataLoader seeds per
    worker (`ldm.data.order.SeededItems` per item)."""
    if size < 1:
        raise InputError(f"image size must be a positive number of pixels, got {size}")
    # a partial of a module-level function pickles, so the transform can travel to worker processes
    return functools.partial(_transform, size=size, random_crop=random_crop, random_flip=random_flip)


def list_images(root: Path) -> list[str]:
    """Relative posix paths of the image files under `root`, sorted; hidden files and folders left out."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        keep = [name for name in names if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        found += [Path(folder, name).relative_to(root).as_posix() for name in keep]
    return sorted(found)


class ImageFolder(Dataset):
    """Every image under `root` (recursive, sorted): item i -> {"image": tensor, "key": relative path}.

    An unreadable file is replaced by the next readable one (i+1, i+2, ... wrapping around) and recorded
    in `self.skip_report` (`self.skipped` is its count), per process. `verify()` finds them all up front.
    """

    def __init__(self, root: str | Path, size: int, *, random_crop: bool = False, random_flip: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist or is not a folder; {DATA_HINT}")
        self.files = list_images(self.root)
        if not self.files:
            raise InputError(f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}); {DATA_HINT}")
        self.size = size
        self.transform = image_transform(size, random_crop=random_crop, random_flip=random_flip)
        self.skip_report = SkipReport()
        self._unreadable: set[int] = set()  # indices into self.files known to be bad in this process

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """How many unreadable files this process has skipped."""
        return self.skip_report.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for offset in range(n):
            i = (index + offset) % n
            if (image := self._read(i)) is not None:
                return {"image": self.transform(image), "key": self.files[i]}
        raise self._all_unreadable()

    def verify(self) -> SkipReport:
        """Decode every file now and drop the unreadable ones, so `len()` and indices are final (call it
        before `split_held_out`). Full decodes, as PIL's `Image.verify()` passes truncated JPEGs: for small folders."""
        readable = [name for i, name in enumerate(self.files) if self._read(i) is not None]
        if not readable:
            raise self._all_unreadable()
        self.files, self._unreadable = readable, set()
        return self.skip_report

    def _read(self, i: int) -> Image.Image | None:
        """File i decoded, or None if it cannot be (recorded in the skip report the first time)."""
        if i in self._unreadable:
            return None
        try:
            return open_image(self.root / self.files[i])
        except Exception as exn:  # PIL raises many types on bad data: OSError, SyntaxError, ValueError, ...
            self._unreadable.add(i)
            self.skip_report.add(self.files[i], exn)
            return None

    def _all_unreadable(self) -> InputError:
        shown = "; ".join(f"{name}: {reason}" for name, reason in self.skip_report.examples[:3])
        return InputError(f"none of the {len(self.files)} images in {self.root} could be read ({shown}); {DATA_HINT}")


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard patterns ('data/{000000..000009}.tar', '::'-joined, or a list of them) -> shard urls.

    Local shards must all exist (a wrong brace range would silently shrink the data); remote urls
    (http://, s3://, pipe:) are passed through unchecked."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in expand_urls(pattern)]
    missing = [url for url in expanded if not re.match(r"\w+:", url) and not os.path.isfile(url)]  # local only
    if missing or not expanded:
        first = f" (first: {missing[0]})" if missing else ""
        shown = " ".join(patterns)
        raise InputError(f"{len(missing)} of the {len(expanded)} shards in {shown!r} do not exist{first}; {SHARD_HINT}")
    return expanded


class ShardStream(IterableDataset):
    """Samples from webdataset .tar shards; broken shards, and samples `_decode` rejects, are skipped and recorded
    in `self.skip_report` (`self.skipped` is its count), per process. Subclasses define `_decode`.

    A stream is read in epochs, each worker its own part. resampled=False (one pass per epoch): the shards are
    shuffled by (seed, epoch), alike on every rank, then split by rank and by worker, so each is read once.
    resampled=True (training): endless; in each epoch each worker draws its share of the shards,
    ceil(shards / (ranks x workers)), with replacement, seeded by (seed, rank, worker, epoch). Samples pass a
    shuffle buffer seeded by (seed, rank, worker, epoch), emptied at each epoch's end; `shuffle_buffer=0` turns
    all shuffling off. `self.epoch` is the epoch the next iteration reads (or starts at); each iteration in this
    process advances it, but DataLoader workers iterate copies: set it before each pass (`endless_batches` does).

    Positions: a worker's samples of an epoch are numbered as they leave the shuffle buffer, before decoding,
    and sample (epoch, index) draws its random choices (caption dropout, crop, flip) from its own generator,
    seeded by (seed, rank, worker, epoch, index): `positioned` skips the samples before a position without
    decoding them, and the rest come out as if none had been skipped (`ldm.data.position` resumes from there).

    The search for the first usable sample of an iteration is bounded: after `max_barren` shard reads and
    skipped samples (repeats counted) in `max_barren_shards` different shards (or all, if fewer), or after a
    whole pass over all the shards, without one, iterating raises one InputError naming the data, the skips
    and the likely fix. Until that first sample the skip warnings are held back (then given), so unusable data
    reads as that one line; one wholly corrupt shard among good ones never stops a run.
    """

    max_barren: ClassVar[int] = 1000  # far above the shuffle buffer's read-ahead (<= 100 samples) of good data
    max_barren_shards: ClassVar[int] = 3
    latents: ClassVar[bool] = False   # what the samples should hold: cached latents, or images
    sample_needs: ClassVar[str] = "an image (.jpg, .jpeg, .png or .webp)"

    def __init__(self, urls: str | Sequence[str], *, shuffle_buffer: int = 1000, resampled: bool = True, seed: int = 0):
        super().__init__()
        self.source = urls if isinstance(urls, str) else " ".join(urls)  # as given, for messages
        self.urls = expand_shards(urls)
        self.seed, self.resampled, self.shuffle_buffer = seed, resampled, shuffle_buffer
        self.epoch = 0
        self.skip_report = SkipReport()
        self._extensions: set[str] = set()  # the extensions of the samples read before the first usable one
        self._searched: set[str] = set()  # the shards read before the first usable sample
        self._skipping = False  # skipping to a resume position: shard reads are not part of the search

    @staticmethod
    def where(rotation: int = 0) -> tuple[int, int, int, int]:
        """(rank, world size, worker, workers) of this process; its DataLoader worker id turned by `rotation`, as
        `ldm.data.position` turns it to have a resumed loader continue with the worker that was next."""
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return rank, world, (worker + rotation) % workers, workers

    def epoch_shards(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """The shards that `worker` of `rank` reads in `epoch`, in order."""
        if self.resampled:
            draws = random.Random(f"shards/{self.seed}/{rank}/{worker}/{epoch}")
            return [draws.choice(self.urls) for _ in range(-(-len(self.urls) // (world * workers)))]
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(urls)
        return urls[rank::world][worker::workers]

    def _epoch_samples(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """The raw samples (bytes by extension, with __key__ and __url__) of a worker's epoch, shuffled."""
        shards = ({"url": url} for url in self.epoch_shards(epoch, rank, world, worker, workers))
        samples = tarfile_samples(self._count_reads(shards), handler=self._skip_shard)
        if self.shuffle_buffer <= 0:
            return samples
        order = random.Random(f"samples/{self.seed}/{rank}/{worker}/{epoch}")
        return wds.filters._shuffle(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), order)

    def positioned(self, *, epoch: int | None = None, rotation: int = 0,
                   start: dict[str, Any] | None = None) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
        """(epoch, index, output) for each usable sample, and (epoch + 1, 0, None) at each epoch's end (the position
        after it); from `epoch` (default: `self.epoch`, which this advances). With `start` ({"epoch", "index",
        "pending": [[epoch, index], ...]}) the samples before (epoch, index) are skipped without being decoded,
        except the pending ones; resampled, the stream begins at the earliest epoch named there."""
        if epoch is None:
            epoch, self.epoch = self.epoch, self.epoch + 1
        rank, world, worker, workers = self.where(rotation)
        resume_at = (start["epoch"], start["index"]) if start else (epoch, 0)
        pending = {(int(e), int(i)) for e, i in start["pending"]} if start else set()
        if start and self.resampled:
            epoch = min([resume_at[0], *(e for e, _ in pending)])
        resumed = resume_at > (epoch, 0) or bool(pending)
        report = self.skip_report
        report.hold()
        self._extensions, self._searched = set(), set()
        try:
            for epoch in itertools.count(epoch) if self.resampled else [epoch]:
                for index, sample in enumerate(self._epoch_samples(epoch, rank, world, worker, workers)):
                    self._skipping = (epoch, index) < resume_at
                    if self._skipping and (epoch, index) not in pending:
                        continue  # consumed before the resume; the samples after it do not depend on it
                    if report.holding:  # no usable sample yet: note what the samples hold, bound the search
                        self._extensions.update(k for k in sample if not k.startswith("__"))
                        self._check_barren()
                    output = self._decode(sample, random.Random(f"{self.seed}/{rank}/{worker}/{epoch}/{index}"))
                    if output is None:
                        self._check_barren()  # the skip just counted
                        continue
                    if report.holding:
                        report.release()  # the first usable sample: the data works, warn about what was skipped
                    yield epoch, index, output
                yield epoch + 1, 0, None
            if report.holding and not self.resampled and world * workers == 1 and not resumed:  # a whole pass
                raise self.nothing_usable(f"a full pass over its {len(self.urls)} shard(s)")
        finally:
            self._skipping = False
            report.release()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (output for _, _, output in self.positioned() if output is not None)

    def _skip_shard(self, exn: Exception) -> bool:
        """webdataset handler: record a broken shard once (its url or open file is in exn.args) and go on."""
        text = " ".join(map(str, exn.args))
        shard = max((url for url in self.urls if url in text), key=len, default="<unknown shard>")
        self.skip_report.add(shard, exn)
        self._check_barren()
        return True

    def _count_reads(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Each shard read counts in the search (an empty or unreadable shard yields no sample to count)."""
        for shard in shards:
            if self.skip_report.holding and not self._skipping:
                self._searched.add(shard["url"])
                self.skip_report.count_search()
                self._check_barren()
            yield shard

    def _check_barren(self) -> None:
        report, shards = self.skip_report, len(self._searched)
        enough_shards = min(len(set(self.urls)), self.max_barren_shards)
        if report.holding and report.barren >= self.max_barren and shards >= enough_shards:
            raise self.nothing_usable(f"{report.barren} shard reads and skipped samples in {shards} shard(s)")

    def nothing_usable(self, searched: str) -> InputError:
        """The error for data with no usable sample in `searched`: the data, the skips, a likely fix."""
        report = self.skip_report
        report.release(warn=False)  # the message sums them up
        example = f" (e.g. {report.examples[0][0]}: {report.examples[0][1]})" if report.examples else ""
        message = (f"no usable sample in {self.source} after {searched}: {report.count} skipped{example}; "
                   f"{self._barren_hint()}")
        return InputError(message.replace("\n", " "))

    def _barren_hint(self) -> str:
        found = self._extensions
        if not found:
            return ("no shard held a sample webdataset can read: give .tar shards as tools/make_shards.py "
                    "(images) or tools/encode_latents.py (latents) write them")
        if self.latents and found & set(SHARD_IMAGE_KEYS):
            return ("these look like image shards: pass them as --data, not --latents (tools/encode_latents.py "
                    "turns them into latent shards)")
        if not self.latents and "mean.npy" in found:
            return ("these look like latent shards from tools/encode_latents.py: pass them to tools/train_ldm.py "
                    "as --latents; --data takes image shards")
        return f"each sample needs {self.sample_needs}; these have .{', .'.join(sorted(found))}"

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        """A raw sample (a dict of bytes by extension, with __key__ and __url__) -> the output dict, its random
        choices drawn from `rng` (the sample's own); None for one it cannot use (recorded in the skip report)."""
        raise NotImplementedError

    @staticmethod
    def sample_name(sample: dict[str, Any]) -> str:
        """'shard-url:key', the name a skipped sample is reported under."""
        return f"{sample.get('__url__')}:{sample['__key__']}"

    @property
    def skipped(self) -> int:
        """How many broken shards and samples this process has skipped."""
        return self.skip_report.count


class WebDatasetImages(ShardStream):
    """Images from webdataset .tar shards: {"image": tensor, "key": __key__}; shuffling, splitting and skipping
    as `ShardStream`."""

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int,
        *,
        random_crop: bool = False,
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
    ):
        self.transform = image_transform(size, random_crop=random_crop, random_flip=random_flip)
        super().__init__(urls, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        if (image := decode_shard_image(sample, self.skip_report)) is None:
            return None
        return {"image": self.transform(image, rng=rng), "key": sample["__key__"]}


def decode_shard_image(sample: dict[str, Any], skip_report: SkipReport) -> Image.Image | None:
    """The image of a raw shard sample (.jpg, .jpeg, .png or .webp), or None, recorded in `skip_report`."""
    name = ShardStream.sample_name(sample)
    key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
    if key is None:
        skip_report.add(name, f"no image in sample (looked for .{', .'.join(SHARD_IMAGE_KEYS)})")
        return None
    try:
        return open_image(io.BytesIO(sample[key]))
    except Exception as exn:  # PIL raises many types on bad data
        skip_report.add(name, exn)
        return None


def build_image_dataset(source: str, size: int, *, train: bool = True, **kw: Any) -> ImageFolder | WebDatasetImages:
    """`--data` -> an `ImageFolder` for an existing folder, `WebDatasetImages` for .tar shards or a brace pattern.

    `train` sets defaults (random flips; for shards, shuffling and endless resampling; train=False: one ordered
    pass, no flips); `kw` overrides them and goes to the chosen class."""
    if os.path.isdir(source):
        return ImageFolder(source, size, **{"random_flip": train, **kw})
    if source.endswith(".tar") or re.search(r"\{.*\}", source):
        defaults = {"random_flip": train, "resampled": train, "shuffle_buffer": 1000 if train else 0}
        return WebDatasetImages(source, size, **{**defaults, **kw})
    raise InputError(f"--data {source!r} is neither an existing folder of images nor .tar shards; {DATA_HINT}")


def split_held_out(dataset: ImageFolder, n_held_out: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Deterministic (train, held_out) split of a folder by a seeded permutation.

    Held-out images always get center crops and no flips, so PSNR/SSIM compare the same pixels at every
    step. Call `dataset.verify()` first, or a bad file's replacement (the next index) may cross the split."""
    n = len(dataset)
    if not 0 <= n_held_out < n:
        raise InputError(
            f"cannot hold out {n_held_out} of the {n} images in {dataset.root}: need 0 <= held-out < {n} so that "
            "one image is left for training; lower the held-out count or add images"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out_view = copy.copy(dataset)
    held_out_view.transform = image_transform(dataset.size, random_crop=False, random_flip=False)
    return Subset(dataset, sorted(order[n_held_out:])), Subset(held_out_view, sorted(order[:n_held_out]))
