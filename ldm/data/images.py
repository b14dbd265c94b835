"""Training images: a folder of images or webdataset shards -> {"image": (3, H, W) in [-1, 1], "key": str}.

Sources yield dicts so later stages can add keys (captions and cached latents: `ldm.data.captions`).
Unreadable images never stop a run: they are skipped, warned about once and counted in a `SkipReport`, per
process: each DataLoader worker counts in its own copy of the dataset, unseen by the main process. To find
every bad file up front, call `ImageFolder.verify()` in the main process. Data with nothing usable at all
does stop a run, with one InputError after a bounded search (`ShardStream.max_barren`, `endless_batches`).
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
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision.transforms import InterpolationMode, RandomCrop
from torchvision.transforms import functional as TF
from webdataset.shardlists import expand_urls

from common.errors import InputError
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


def _transform(image: Image.Image, *, size: int, random_crop: bool, random_flip: bool) -> torch.Tensor:
    image = to_rgb(image)
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)  # shorter side
    if random_crop:
        image = TF.crop(image, *RandomCrop.get_params(image, (size, size)))
    else:
        image = TF.center_crop(image, [size, size])
    if random_flip and torch.rand(()) < 0.5:
        image = TF.hflip(image)
    return TF.pil_to_tensor(image).float().div(127.5).sub(1.0)


def image_transform(size: int, *, random_crop: bool, random_flip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float32 (3, size, size) in [-1, 1]: RGB (transparency on white), shorter side to `size`
    (bicubic, antialiased), center or random square crop, optional horizontal flip. Random draws use torch's
    global generator, which the DataLoader seeds per worker."""
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

    resampled=True (training): endless; each rank and worker draws shards with replacement, seeded by (seed,
    rank, worker, epoch), so no splitting is needed; fresh workers replay the same draws, so pass a new
    `seed` when resuming. resampled=False: one pass; shards are shuffled alike on every rank, then split by
    node and by worker, so each is read once. `shuffle_buffer=0` turns all shuffling off.

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
        self.seed = seed
        self.resampled = resampled
        self.skip_report = SkipReport()
        self._extensions: set[str] = set()  # the extensions of the samples read before the first usable one
        self._searched: set[str] = set()  # the shards read before the first usable sample
        if resampled:
            stages: list[Any] = [wds.ResampledShards(self.urls, seed=seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.urls)]
            if shuffle_buffer > 0:
                stages.append(wds.detshuffle(len(self.urls), initial=len(self.urls), seed=seed))
            stages += [wds.split_by_node, wds.split_by_worker]
        stages += [self._count_reads, wds.tarfile_to_samples(handler=self._skip_shard)]
        if shuffle_buffer > 0 and resampled:
            # Ranks and workers may draw the same shard: give each its own sample order too.
            self._shuffle_args = (shuffle_buffer, min(shuffle_buffer, 100))
            stages.append(self._rank_shuffle)
        elif shuffle_buffer > 0:
            stages.append(wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
        stages += [self._watch_samples, self._decode]
        self.pipeline = wds.DataPipeline(*stages)

    def _rank_shuffle(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A shuffle buffer seeded by (seed, rank, worker): deterministic, different on every rank and worker."""
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        bufsize, initial = self._shuffle_args
        yield from wds.filters._shuffle(samples, bufsize, initial, random.Random(f"{self.seed}-{rank}-{worker}"))

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
            if self.skip_report.holding:
                self._searched.add(shard["url"])
                self.skip_report.count_search()
                self._check_barren()
            yield shard

    def _watch_samples(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Before `_decode`: while no sample was usable, note what the samples hold and bound the search."""
        for sample in samples:
            if self.skip_report.holding:
                self._extensions.update(k for k in sample if not k.startswith("__"))
                self._check_barren()
            yield sample

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

    def _decode(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Raw samples (dicts of bytes by extension, with __key__ and __url__) -> output dicts."""
        raise NotImplementedError

    @staticmethod
    def sample_name(sample: dict[str, Any]) -> str:
        """'shard-url:key', the name a skipped sample is reported under."""
        return f"{sample.get('__url__')}:{sample['__key__']}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        report = self.skip_report
        report.hold()
        self._extensions, self._searched = set(), set()
        try:
            for item in self.pipeline:
                if report.holding:
                    report.release()  # the first usable sample: the data works, warn about what was skipped
                yield item
            _, world, _, workers = wds.utils.pytorch_worker_info()
            if report.holding and not self.resampled and world * workers == 1:  # a pass over every shard
                raise self.nothing_usable(f"a full pass over its {len(self.urls)} shard(s)")
        finally:
            report.release()

    @property
    def skipped(self) -> int:
        """How many broken shards and samples this process has skipped."""
        return self.skip_report.count


def endless_batches(loader: DataLoader) -> Iterator[Any]:
    """`loader`'s batches, pass after pass, the first one fetched now: data with nothing usable stops here, before
    training, with one InputError, also when it is raised in a loader worker (the DataLoader wraps it in the
    worker's traceback: unwrapped here) and when a whole pass (resampled=False) gives no batch at all."""
    batches = _passes(loader)
    return itertools.chain([next(batches)], batches)


def _passes(loader: DataLoader) -> Iterator[Any]:
    while True:
        empty = True
        try:
            for batch in loader:
                empty = False
                yield batch
        except InputError as exn:
            raise InputError(worker_error_message(exn)) from None
        if empty:
            raise _empty_pass_error(loader)


def worker_error_message(exn: BaseException) -> str:
    """The one-line message of an exception, also of one re-raised from a DataLoader worker (whose message is
    "Caught X in DataLoader worker process N. Original Traceback ...", ending in "module.X: message")."""
    text = str(exn)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        return text.rstrip().splitlines()[-1].split(f"{type(exn).__name__}: ", 1)[-1]
    return text


def _empty_pass_error(loader: DataLoader) -> InputError:
    dataset = loader.dataset
    name = getattr(dataset, "source", type(dataset).__name__)
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    workers = loader.num_workers
    skipped = (f"{dataset.skipped} skipped" if workers == 0 else "skips counted in the loader workers, whose "
               "warnings name them") if hasattr(dataset, "skipped") else "nothing skipped"
    shards = f"{len(dataset.urls)} shards split over " if hasattr(dataset, "urls") else ""
    return InputError(f"a full pass over {name} gave process {rank} no sample ({shards}{world} process(es) x "
                      f"{max(workers, 1)} loader worker(s); {skipped}): check the shards, give at least one shard "
                      "per process and worker, or set train.resampled=true")


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

    def _decode(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            if (image := decode_shard_image(sample, self.skip_report)) is not None:
                yield {"image": self.transform(image), "key": sample["__key__"]}


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
