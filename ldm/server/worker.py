"""One model worker and a bounded FIFO queue: requests run one at a time on the model.

The HTTP side submits a job (a function of a `Progress`) and awaits its future; the worker thread
runs jobs in order. A full queue refuses at once (`QueueFull`, the server's 503 with Retry-After).
A job cancelled before it starts (its client went away) is dropped from the queue; cancelling the
running job interrupts it at its next sampling step, as A1111's /interrupt does; /skip ends only the
batch being sampled (the job goes on with the next), as A1111's. Everything a job
raises goes to its own future, so no request can stop the worker.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("ldm.server")


class QueueFull(Exception):
    """The queue holds its limit of waiting jobs; `retry_after`: seconds until a place is likely free."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({limit} requests waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Interrupted(Exception):
    """Raised inside a job at a sampling step after /interrupt, a cancel, or a shutdown."""


class Skipped(Interrupted):
    """Raised inside a job at a sampling step after /skip: the batch being sampled ends there, the job goes on."""


class ShuttingDown(Exception):
    """A queued job was dropped because the server is stopping."""


@dataclass
class Progress:
    """What /progress reports about the running job; the job calls `step` at each sampling step."""

    job: "Job"
    steps: int = 0  # sampling steps of the whole job (all batches)
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    preview: Callable[[], Any] | None = None  # the latest denoised estimate, as a decodable thunk
    text: str = ""

    def step(self, preview: Callable[[], Any] | None = None) -> None:
        if self.job.interrupted.is_set():
            raise Interrupted()
        if self.job.skipped.is_set():
            self.job.skipped.clear()
            raise Skipped()
        self.done += 1
        self.preview = preview

    def check(self) -> None:
        if self.job.interrupted.is_set():
            raise Interrupted()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.steps) if self.steps else 0.0

    @property
    def eta(self) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / self.fraction - elapsed if self.fraction > 0 else 0.0


@dataclass
class Job:
    run: Callable[[Progress], Any]
    name: str
    number: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)  # /skip: end the batch being sampled
    submitted: float = field(default_factory=time.monotonic)


class Worker:
    """The queue and the thread that drains it. `queue_size`: most jobs waiting (the running one not counted)."""

    def __init__(self, queue_size: int = 8):
        self.queue_size = queue_size
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._numbers = itertools.count(1)
        self._stopping = False
        self.current: Progress | None = None
        self.last_interrupted = False
        self.durations: collections.deque[float] = collections.deque(maxlen=20)  # seconds of recent jobs
        self.completed = 0
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Progress], Any], name: str = "job") -> Job:
        """Queue `run`; its result or exception comes through `job.future`. QueueFull / ShuttingDown if refused."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.queue_size, self.retry_after())
            job = Job(run, name, next(self._numbers))
            self._queue.append(job)
            self._lock.notify()
            return job

    def check_room(self) -> None:
        """QueueFull now if no place is free (a refusal before the request is parsed further; `submit` checks
        again, as places may fill meanwhile)."""
        with self._lock:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.queue_size, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one job (the mean of recent job times, at least 1)."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 5.0
        return max(1, math.ceil(mean))

    def cancel(self, job: Job) -> None:
        """Drop `job` from the queue, or interrupt it if it runs (its client no longer waits for it)."""
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                job.future.cancel()
                log.info("dropped queued %s #%d: its client went away", job.name, job.number)
                return
        job.interrupted.set()

    def interrupt(self) -> bool:
        """Stop the running job at its next step (A1111's /interrupt); False if none runs."""
        return self._tell_running("interrupted")

    def skip(self) -> bool:
        """End the batch the running job samples now and go on with its next (A1111's /skip); False if none runs."""
        return self._tell_running("skipped")

    def _tell_running(self, event: str) -> bool:
        current = self.current
        if current is None:
            return False
        getattr(current.job, event).set()
        return True

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def stop(self) -> None:
        """Refuse new jobs, drop the waiting ones (their futures raise ShuttingDown) and interrupt the running one.
        Returns at once (safe in a signal handler); `join` waits for the thread."""
        with self._lock:
            self._stopping = True
            while self._queue:
                self._queue.popleft().future.set_exception(ShuttingDown("the server is shutting down"))
            self._lock.notify_all()
        self.interrupt()

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            progress = Progress(job)
            self.current = progress
            start = time.monotonic()
            try:
                job.future.set_result(job.run(progress))
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to its request, not to the worker
                if not isinstance(exc, (Interrupted, ValueError)):
                    log.exception("%s #%d failed", job.name, job.number)
                job.future.set_exception(exc)
            finally:
                self.last_interrupted = job.interrupted.is_set()
                self.current = None
                self.durations.append(time.monotonic() - start)
                self.completed += 1
