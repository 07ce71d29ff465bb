"""Per-pair queues and the one model worker (a thread) that answers them.

The worker serves the resident pair's queue first, taking up to `max_batch` inputs of that pair per
turn. When another pair's oldest request has waited longer than `max_wait` seconds (or the resident
pair has nothing waiting), it switches to the pair with the oldest waiting request: no pair starves.
Requests are `concurrent.futures.Future`s, so the HTTP side awaits them without blocking. At most
`max_queued` inputs wait at once (a cancelled request counts until the worker drops it): a request that
would go over is refused (`QueueFull`; one alone in an empty queue is always taken), so an overloaded server says at once that it is busy rather than letting
every wait grow.

By default each request of a turn is its own forward pass, so its answer is bit-identical to what a
one-shot composition of the pair predicts for the same inputs: CPU matrix kernels sum in an order that
depends on the batch's shape, so merging requests changes scores in their last bits. With `merge`,
the turn's inputs go through forward passes of up to `max_batch` inputs (more throughput, mostly on GPUs).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..predict import Prediction
from .engine import ServingEngine
from .metrics import ServeMetrics
from .pairs import Pair


class ServerStopping(RuntimeError):
    """The server is shutting down and takes no new requests."""


class QueueFull(RuntimeError):
    """Taking the request would queue more inputs than the server allows."""


@dataclass
class Job:
    """One request: its pair, its inputs and the future its answer goes to."""

    pair: Pair
    texts: list[str]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    """`submit` queues a request; the worker thread started by `start` answers; `stop` drains and ends it."""

    def __init__(self, engine: ServingEngine, metrics: ServeMetrics, max_batch: int, max_wait: float,
                 merge: bool = False, max_queued: int | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait, self.merge, self.max_queued = max_batch, max_wait, merge, max_queued
        self._queues: dict[Hashable, deque[Job]] = {}
        self._queued = 0  # inputs in `_queues`
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sft-serve-worker", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def queued_inputs(self) -> int:
        with self._condition:
            return self._queued

    def submit(self, pair: Pair, texts: Sequence[str]) -> Future:
        job = Job(pair, list(texts))
        with self._condition:
            if self._stopping:
                raise ServerStopping("the server is shutting down; send the request again once it is back")
            if self.max_queued is not None and self._queued and self._queued + len(job.texts) > self.max_queued:
                raise QueueFull(f"the server is busy: {self._queued} inputs are waiting (at most {self.max_queued}); "
                                "send the request again shortly")
            self._queues.setdefault(pair.key, deque()).append(job)
            self._queued += len(job.texts)
            self._condition.notify()
        return job.future

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer what is queued, then end the worker."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join()

    # ---- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._queues:  # a queue leaves `_queues` when it empties
                    self._condition.wait()
                if not self._queues:
                    return
                jobs = self._take(self._choose())
            if jobs:
                self._serve(jobs)

    def _choose(self) -> Hashable:
        """The resident pair while it has requests and nobody else waited over `max_wait`; else the oldest waiting."""
        waiting = self._queues
        oldest = min(waiting, key=lambda key: waiting[key][0].enqueued)
        resident = self.engine.resident.key if self.engine.resident is not None else None
        if resident in waiting and time.monotonic() - waiting[oldest][0].enqueued <= self.max_wait:
            return resident
        return oldest

    def _take(self, key: Hashable) -> list[Job]:
        """Jobs from the front of one queue, up to `max_batch` inputs (at least one job); cancelled ones dropped."""
        queue, jobs, inputs = self._queues[key], [], 0
        while queue and (not jobs or inputs + len(queue[0].texts) <= self.max_batch):
            job = queue.popleft()
            self._queued -= len(job.texts)
            if job.future.set_running_or_notify_cancel():
                jobs.append(job)
                inputs += len(job.texts)
        if not queue:
            del self._queues[key]
        return jobs

    def _serve(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.enqueued)
        try:
            changed = self.engine.switch(jobs[0].pair)
            swapped = time.monotonic()
            if changed:
                self.metrics.swap_seconds.observe(swapped - started)
                for kind in changed:
                    self.metrics.swaps.labels(kind=kind).inc()
            texts = [text for job in jobs for text in job.texts]
            if self.merge:
                batches = [texts[first:first + self.max_batch] for first in range(0, len(texts), self.max_batch)]
            else:
                batches = [job.texts for job in jobs]
            predictions: list[Prediction] = []
            for batch in batches:
                self.metrics.batch_inputs.observe(len(batch))
                predictions += self.engine.predict(batch)
            self.metrics.forward_seconds.observe(time.monotonic() - swapped)
        except Exception as exc:  # the request fails; the worker and the resident model carry on
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job in jobs:
            job.future.set_result(predictions[:len(job.texts)])
            predictions = predictions[len(job.texts):]
