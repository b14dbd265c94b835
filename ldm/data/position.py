"""Where a stream of training batches is, so that a resumed run sees the batches an uninterrupted one would.

A `ShardStream` numbers each worker's samples of an epoch as they leave the shuffle buffer and gives each its own
random generator (`ShardStream.positioned`): a worker's position is (epoch, index), and the samples after it do
not depend on the ones before. `PositionedBatches` batches the samples in the worker and tags each batch with
where its worker stands after it: the next position, and the samples drawn but still waiting in part-filled
bucket buffers ("pending"). `ResumableBatches`, in the main process, runs the DataLoader pass after pass and
keeps, per worker, the position of the last batch it handed out (the workers prefetch, so their own counters run
ahead of what was consumed); `state()` is that, as a small JSON-able dict. A new stream given the state skips what
was consumed (read, never decoded: at most one epoch of reading per worker) and has the DataLoader's round-robin
over its workers (batch i from worker i mod workers, exhausted workers left out) begin with the worker that was
next. `endless_batches` is the plain form, for loaders of any dataset.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate

from common.errors import InputError

POSITION = "position"  # the batch field that carries it from the worker to `ResumableBatches`, which removes it
STATE_VERSION = 1
Position = tuple[int, int]  # (epoch, index) in one worker's stream


def endless_batches(loader: DataLoader) -> Iterator[Any]:
    """`loader`'s batches, pass after pass, the first one fetched now: data with nothing usable stops here, before
    training, with one InputError, also when it is raised in a loader worker (the DataLoader wraps it in the
    worker's traceback: unwrapped here) and when a whole pass (resampled=False) gives no batch at all. A
    `ShardStream` is told each pass's epoch (its loader workers are new each pass)."""
    batches = _passes(loader)
    return itertools.chain([next(batches)], batches)


def _passes(loader: DataLoader) -> Iterator[Any]:
    for epoch in itertools.count():
        if hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch = epoch
        if (yield from _one_pass(loader)):
            raise _empty_pass_error(loader)


def _one_pass(loader: DataLoader) -> Generator[Any, None, bool]:
    """One pass over `loader`, an InputError raised in a loader worker unwrapped to its one line; returns whether
    the pass gave no batch."""
    empty = True
    try:
        for batch in loader:
            empty = False
            yield batch
    except InputError as exn:
        raise InputError(worker_error_message(exn)) from None
    return empty


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


def positioned_batches(events: Iterable[tuple[int, int, Any]], batch_size: int, *, shape_of: str | None,
                       collate: Callable[[list[Any]], Any]) -> Iterator[tuple[Any, Position, list[list[int]]]]:
    """(batch, the position after it, the positions of the samples still waiting) from (epoch, index, sample)
    events, where a sample None marks an epoch's end (at the position after it).

    shape_of=None: one buffer, a batch each time it fills, across epochs. A field name: one buffer per shape of
    `sample[shape_of]` (aspect-ratio buckets), and at each epoch's end the part-filled buffers go out as smaller
    batches, so no sample waits into another epoch. When the events end, what is left goes out too. The
    part-filled buffers go out oldest waiting sample first: an order that depends only on what waits, so a
    resumed stream, its waiting samples decoded again, repeats it."""
    buffers: dict[tuple[int, ...], list[tuple[Position, Any]]] = {}

    def batch_of(buffer: list[tuple[Position, Any]], after: Position) -> tuple[Any, Position, list[list[int]]]:
        pending = sorted(position for rest in buffers.values() for position, _ in rest)
        return collate([sample for _, sample in buffer]), after, [list(position) for position in pending]

    def flush(after: Position) -> Iterator[tuple[Any, Position, list[list[int]]]]:
        for shape in sorted(buffers, key=lambda s: buffers[s][0][0]):
            yield batch_of(buffers.pop(shape), after)

    after = (0, 0)
    for epoch, index, sample in events:
        if sample is None:
            after = (epoch, index)
            if shape_of is not None:
                yield from flush(after)
            continue
        shape = tuple(sample[shape_of].shape) if shape_of is not None else ()
        buffers.setdefault(shape, []).append(((epoch, index), sample))
        if len(buffers[shape]) == batch_size:
            yield batch_of(buffers.pop(shape), (epoch, index + 1))
    yield from flush(after)


class PositionedBatches(IterableDataset):
    """A `ShardStream`'s samples as batches made in the loader worker (for a DataLoader with batch_size=None and
    `ldm.data.buckets.unbatched`), each tagged under POSITION with {"worker", "epoch", "index", "pending"}: where
    its worker's stream stands after it (`positioned_batches`; shape_of=None: plain batches, a pass's last one
    maybe smaller; a field: one bucket per batch). `collate` makes a batch of a list of samples (default: torch's
    default_collate). `epoch`, `rotation` and `starts` (worker -> position to resume from) are set by
    `ResumableBatches` before each pass. The stream's `skipped`, `source` and `urls` show through."""

    def __init__(self, stream: Any, batch_size: int, *, collate: Callable[[list[Any]], Any] | None = None,
                 shape_of: str | None = None):
        super().__init__()
        self.stream, self.batch_size, self.shape_of = stream, batch_size, shape_of
        self.collate = collate or default_collate
        self.epoch, self.rotation, self.starts = 0, 0, {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = self.stream.where(self.rotation)[2]
        events = self.stream.positioned(epoch=self.epoch, rotation=self.rotation, start=self.starts.get(worker))
        for batch, (epoch, index), pending in positioned_batches(events, self.batch_size, shape_of=self.shape_of,
                                                                 collate=self.collate):
            batch[POSITION] = {"worker": worker, "epoch": epoch, "index": index, "pending": pending}
            yield batch

    @property
    def skipped(self) -> int:
        return self.stream.skipped

    @property
    def source(self) -> str:
        return self.stream.source

    @property
    def urls(self) -> list[str]:
        return self.stream.urls


class ResumableBatches:
    """Endless batches of `loader` (over a `PositionedBatches`), pass after pass, that know where they are:
    `state()` after any batch. With `resume`, a state saved from a stream of the same layout (`identity`: the
    shards, `seed`, rank, world size, loader workers, batch size, bucketing, shuffling), the stream goes on exactly
    from there, with the saved stream seed; otherwise (`problem` says why) it starts afresh with the seed `reseed`
    (default `seed`). `start()` fetches the first batch: data with nothing usable stops there with one InputError,
    as with `endless_batches`."""

    def __init__(self, loader: DataLoader, *, seed: int, resume: dict[str, Any] | None = None,
                 reseed: int | None = None):
        self.loader, self.batched = loader, loader.dataset
        self.stream = self.batched.stream
        self.workers = max(loader.num_workers, 1)
        rank, world, _, _ = self.stream.where()
        self.identity = {"seed": seed, "rank": rank, "world_size": world, "num_workers": loader.num_workers,
                         "batch_size": self.batched.batch_size, "bucketed": self.batched.shape_of is not None,
                         "resampled": self.stream.resampled, "shuffle_buffer": self.stream.shuffle_buffer,
                         "data": hashlib.sha256("\n".join(self.stream.urls).encode()).hexdigest()[:16]}
        self.problem = resume_problem(resume, self.identity)
        saved = resume if self.problem is None else {}
        self.stream.seed = saved.get("stream_seed", seed if reseed is None else reseed)
        self.batches, self.samples = saved.get("batches", 0), saved.get("samples", 0)
        self.at = _Cursor(self.workers, saved.get("epoch", 0), saved.get("last_worker"),
                          {w: {k: at[k] for k in ("epoch", "index", "pending")}
                           for w, at in enumerate(saved.get("workers", []))}, resuming=bool(saved))
        self._first: dict[str, Any] | None = None
        self._passes = _resumable_passes(loader, self.at)

    def start(self) -> ResumableBatches:
        """Fetch the first batch now (it is the next one handed out)."""
        if self._first is None:
            self._first = next(self._passes)
        return self

    def __iter__(self) -> ResumableBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        batch, self._first = (self._first, None) if self._first is not None else (next(self._passes), None)
        at = batch.pop(POSITION)
        self.at.positions[at["worker"]] = {"epoch": at["epoch"], "index": at["index"], "pending": at["pending"]}
        self.at.last_worker = at["worker"]
        self.batches += 1
        self.samples += len(batch["key"])
        return batch

    def position(self, worker: int) -> dict[str, Any]:
        """{"epoch", "index", "pending"}: where `worker` stands after the last batch of it handed out."""
        return self.at.positions.get(worker, {"epoch": self.at.epoch, "index": 0, "pending": []})

    def state(self) -> dict[str, Any]:
        """Where the stream is, after the batches handed out so far, to pass as `resume` (the same stream, rank and
        layout): the `identity`, "stream_seed", "epoch" (the pass: resampled=False), "batches" and "samples" handed
        out, "last_worker" (whose batch was last) and per worker its position and, for people, "shards": the
        shards of its epoch in order, and "samples_consumed": how many of that epoch's samples it has handed out
        (read samples, unusable ones included)."""
        rank, world = self.identity["rank"], self.identity["world_size"]
        workers = []
        for worker in range(self.workers):
            at = self.position(worker)
            waiting = sum(epoch == at["epoch"] for epoch, _ in at["pending"])
            workers.append({**at, "shards": self.stream.epoch_shards(at["epoch"], rank, world, worker, self.workers),
                            "samples_consumed": at["index"] - waiting})
        return {"version": STATE_VERSION, **self.identity, "stream_seed": self.stream.seed,
                "source": self.stream.source, "epoch": self.at.epoch, "batches": self.batches, "samples": self.samples,
                "last_worker": self.at.last_worker, "workers": workers}


@dataclass
class _Cursor:
    """Where the batches handed out have left the stream: the pass's epoch, whose batch was last, and each worker's
    position after its last batch; `resuming` while the pass begun from a saved state runs."""

    workers: int
    epoch: int = 0
    last_worker: int | None = None
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)
    resuming: bool = False


def _resumable_passes(loader: DataLoader, at: _Cursor) -> Iterator[dict[str, Any]]:
    """`loader`'s passes, each begun where `at` says. A function apart from `ResumableBatches`, so that the two make
    no reference cycle: a dropped stream then stops its loader workers at once (collected in a cycle, the loader's
    queues are closed before it is, and stopping each worker waits out a 5 s timeout)."""
    batched = loader.dataset
    while True:
        batched.epoch = at.epoch
        batched.rotation = 0 if at.last_worker is None else (at.last_worker + 1) % at.workers
        batched.starts = dict(at.positions) if at.resuming else {}
        empty = yield from _one_pass(loader)
        if empty and not at.resuming:  # a resumed pass may have been handed out whole already
            raise _empty_pass_error(loader)
        # The pass is over (resampled=False): the next epoch, from its start, worker 0 first.
        at.epoch, at.last_worker, at.positions, at.resuming = at.epoch + 1, None, {}, False


def resume_problem(saved: Any, identity: dict[str, Any]) -> str | None:
    """Why the stream cannot resume exactly from `saved` (a `ResumableBatches.state()`), or None when it can."""
    if saved is None:
        return "no data position was saved"
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        return "the saved data position is of another version"
    differ = [f"{name} {saved.get(name)!r}, now {value!r}" for name, value in identity.items()
              if saved.get(name) != value]
    if differ:
        return f"the data position was saved with {'; '.join(differ)}"
    try:
        workers = [(int(at["epoch"]), int(at["index"]), [(int(e), int(i)) for e, i in at["pending"]])
                   for at in saved["workers"]]
        int(saved["stream_seed"]), int(saved["epoch"]), int(saved["batches"]), int(saved["samples"])
        last = saved["last_worker"]
    except (KeyError, TypeError, ValueError):
        return "the saved data position is incomplete"
    if len(workers) != max(identity["num_workers"], 1) or not (last is None or 0 <= int(last) < len(workers)):
        return "the saved data position is incomplete"
    return None
