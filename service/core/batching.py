"""Dynamic batching: concurrent requests to one model version gathered into one run.

One ``ModelBatcher`` per loaded model version, living on the event loop, with its own
inference thread(s) (onnxruntime releases the GIL, so HTTP work on the loop and compute in the
thread overlap on two cores). The policy is greedy, as in Triton's dynamic batcher with no
preferred sizes:

- an idle batcher runs a lone request at once: no timer, no added latency;
- while a run is in flight, requests queue; when it ends, whatever is queued forms the next
  batch, up to ``max_size`` samples (a request's own batch counts toward it; a request larger
  than ``max_size`` runs alone, unsplit);
- ``max_delay_s`` > 0 lets the oldest queued request wait up to that long, counted from its
  arrival, for others to fill the batch once a worker is free (never when idle);
- requests without statistics and requests with statistics never share a run: the first run
  the plain session and pay nothing for statistics; statistics requests run the instrumented
  session together, each summarised over its own samples (``LoadedModel.run_split``);
- requests whose samples differ in shape (models with dynamic spatial dims) never share a run;
- admission by time: a request whose expected wait (the samples queued and running ahead of
  it times the measured seconds per sample of recent runs, shared among the
  workers) would pass ``deadline_s`` raises ``OverloadedError`` at once, with the time the
  queue needs to drain that far; an idle batcher lets any request in, and before the first
  run nothing is measured and all are let in;
- at most ``max_queue`` requests wait whatever their expected wait (a hard bound on memory);
  one more raises ``QueueFullError`` at once.

If a merged run fails, each of its requests is run again alone, so one bad input cannot fail
the others it was batched with. A request whose samples give a non-finite output (a finite
input that overflows inside the model) fails alone without a second run:
``LoadedModel.run_split`` hands it its error beside the others' results, and its samples are
not reported to the monitor. Nothing here knows about HTTP.

``inline=True`` (small models, ``DataPlane``) runs the batches on the event loop instead: a
request finding the batcher idle schedules the run for the end of the current loop step, so
the requests that arrive in that step share it; no thread hand-off, no wake-ups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.runtime.loaded_model import LoadedModel, RunResult

logger = logging.getLogger(__name__)
_RUNS_AVERAGED = 8


class QueueFullError(RuntimeError):
    """The model's queue holds ``max_queue`` requests already."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} requests are already queued (limit {limit})")
        self.queued = queued
        self.limit = limit


class OverloadedError(RuntimeError):
    """The request's expected wait would pass the deadline."""

    def __init__(self, queued: int, expected_s: float, deadline_s: float) -> None:
        super().__init__(
            f"{queued} samples are already queued: the expected wait of {expected_s:.2f} s "
            f"is over the deadline of {deadline_s:g} s"
        )
        self.queued = queued
        self.expected_s = expected_s
        self.deadline_s = deadline_s


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no more requests."""


@dataclass(eq=False)
class _Request:
    """One request waiting for (or in) a run."""

    model: LoadedModel
    x: np.ndarray  # (n, ...) already validated and contiguous
    stats: str
    key: tuple[Any, ...]  # requests share a run only when their keys are equal
    future: asyncio.Future[RunResult]
    enqueued: float
    started: float = 0.0

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class BatchReport:
    """What one finished run tells the metrics: sizes, waits and run time."""

    model: LoadedModel
    samples: int
    requests: int
    stats: str  # "none", or the highest level asked in the batch
    run_seconds: float
    queue_seconds: list[float] = field(default_factory=list)
    # Per-sample active rates of the run's samples, one part per request that got them (a
    # run of the statistics session), in order: the monitor is fed once per run.
    activity: list[Mapping[str, np.ndarray]] = field(default_factory=list)


class ModelBatcher:
    """Greedy dynamic batcher for one model version (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        max_size: int,
        max_delay_s: float = 0.0,
        max_queue: int = 64,
        deadline_s: float = float("inf"),
        workers: int = 1,
        on_batch: Callable[[BatchReport], None] | None = None,
        inline: bool = False,
    ) -> None:
        self.name = name
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self.workers = workers
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._in_flight = 0  # runs started and not finished
        self._running_requests = 0
        self._waiting_samples = 0  # in _queue
        self._running_samples = 0
        self.seconds_per_sample = 0.0  # of recent runs (a moving average); 0: none yet
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{name}")
        self._closed = False
        self._drained: asyncio.Event | None = None
        self.inline = inline
        self._dispatch_pending = False

    # ---------------------------------------------------------------- state

    @property
    def queued(self) -> int:
        """Requests waiting for a run."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Requests waiting for or in a run."""
        return len(self._queue) + self._running_requests

    # ---------------------------------------------------------------- submitting

    def submit(self, model: LoadedModel, x: np.ndarray, stats: str) -> asyncio.Future[RunResult]:
        """Queue ``x`` (validated, (n, ...)) for ``model``; the future resolves with its own
        result. Must be called on the event loop."""
        if self._closed:
            raise BatcherClosedError(f"model {self.name!r} is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(len(self._queue), self.max_queue)
        ahead = self._waiting_samples + self._running_samples  # idle: always let in
        expected = ahead * self.seconds_per_sample / self.workers
        if expected > self.deadline_s:
            raise OverloadedError(ahead, expected, self.deadline_s)
        loop = self._loop
        if loop is None:  # a batcher lives and dies with the serving loop (DataPlane.stop)
            # Looked up once: asyncio.get_running_loop() makes a getpid() system call on
            # every call before Python 3.12, ~7% of the event loop's time under load.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[RunResult] = loop.create_future()
        key = ("none" if stats == "none" else "stats", x.shape[1:], x.dtype)
        self._queue.append(_Request(model, x, stats, key, future, time.perf_counter()))
        self._waiting_samples += x.shape[0]
        if self._in_flight < self.workers:
            if self.inline:
                if not self._dispatch_pending:  # at the end of this loop step, with the
                    self._dispatch_pending = True  # requests that arrive in it
                    loop.call_soon(self._dispatch)
            elif self._timer is None:
                self._dispatch()  # idle: a lone request runs at once
            elif self._queued_samples(key) >= self.max_size:
                self._timer.cancel()  # the batch is full: no reason to wait longer
                self._timer = None
                self._dispatch()
        return future

    def _queued_samples(self, key: tuple[Any, ...]) -> int:
        return sum(r.size for r in self._queue if r.key == key)

    # ---------------------------------------------------------------- running

    def _take_batch(self) -> list[_Request]:
        """The oldest live request and the queued ones that fit with it, in arrival order."""
        queue = self._queue
        while queue and queue[0].future.done():  # timed out or cancelled while queued
            queue.popleft()
        if not queue:
            return []
        first = queue.popleft()
        batch, total = [first], first.size
        if total >= self.max_size or len(queue) == 0:
            return batch
        kept: deque[_Request] = deque()
        while queue:
            request = queue.popleft()
            if request.future.done():
                continue
            if request.key == first.key and total + request.size <= self.max_size:
                batch.append(request)
                total += request.size
                if total >= self.max_size:
                    break
            else:
                kept.append(request)
        kept.extend(queue)
        self._queue = kept
        return batch

    def _count_queued(self) -> None:
        self._waiting_samples = sum(r.size for r in self._queue)

    def _dispatch(self) -> None:
        """Start runs while a worker is free and requests wait (on the event loop)."""
        self._dispatch_pending = False
        while self._in_flight < self.workers:
            batch = self._take_batch()
            self._count_queued()
            if not batch:
                break
            samples = sum(r.size for r in batch)
            self._in_flight += 1
            self._running_requests += len(batch)
            self._running_samples += samples
            if self.inline:
                self._finish(batch, *self._compute(batch), reschedule=False)
                continue
            try:
                self._executor.submit(self._work, batch)
            except RuntimeError:  # the executor shut down under us
                self._in_flight -= 1
                self._running_requests -= len(batch)
                self._running_samples -= samples
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(
                            BatcherClosedError(f"model {self.name!r} is shutting down")
                        )
        self._check_drained()

    def _schedule(self) -> None:
        """After a run: dispatch now, or wait for the oldest request's delay to run out."""
        if not self._queue or self._in_flight >= self.workers or self._timer is not None:
            self._check_drained()
            return
        if self.max_delay_s > 0:
            oldest = self._queue[0]
            deadline = oldest.enqueued + self.max_delay_s
            wait = deadline - time.perf_counter()
            if wait > 0 and self._queued_samples(oldest.key) < self.max_size:
                assert self._loop is not None
                self._timer = self._loop.call_later(wait, self._timer_fired)
                return
        self._dispatch()

    def _timer_fired(self) -> None:
        self._timer = None
        self._dispatch()

    def _work(self, batch: list[_Request]) -> None:
        """In the inference thread: one run for the batch, then hand the results back."""
        outcomes, seconds = self._compute(batch)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._finish, batch, outcomes, seconds)
        except RuntimeError:  # the loop is closed: nobody waits any more
            logger.debug("model %s: event loop closed before a run finished", self.name)

    def _compute(self, batch: list[_Request]) -> tuple[list[RunResult | BaseException], float]:
        """One run for the batch: each request's outcome, and the run's seconds."""
        started = time.perf_counter()
        for request in batch:
            request.started = started
        outcomes: list[RunResult | BaseException]
        try:
            model = batch[0].model
            # (sum n, ...): one copy into the run's input; a lone request needs none
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            outcomes = list(model.run_split(x, [r.size for r in batch], [r.stats for r in batch]))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            outcomes = self._run_alone(batch) if len(batch) > 1 else [exc]
        return outcomes, time.perf_counter() - started

    @staticmethod
    def _run_alone(batch: list[_Request]) -> list[RunResult | BaseException]:
        """A merged run failed: run each request by itself so only the bad one fails."""
        outcomes: list[RunResult | BaseException] = []
        for request in batch:
            try:
                outcomes.append(request.model.run(request.x, request.stats))
            except Exception as exc:  # noqa: BLE001 - handed to that request only
                outcomes.append(exc)
        return outcomes

    def _finish(
        self,
        batch: list[_Request],
        outcomes: list[RunResult | BaseException],
        seconds: float,
        *,
        reschedule: bool = True,
    ) -> None:
        """On the event loop: resolve each request's future, report, start the next run
        (unless ``_dispatch`` itself goes on)."""
        samples = sum(r.size for r in batch)
        self._in_flight -= 1
        self._running_requests -= len(batch)
        self._running_samples -= samples
        self._measure(samples, seconds)
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        if reschedule:
            self._schedule()
        if self._on_batch is not None:
            levels = {r.stats for r in batch}
            level = "channels" if "channels" in levels else batch[0].stats
            try:
                self._on_batch(
                    BatchReport(
                        model=batch[0].model,
                        samples=samples,
                        requests=len(batch),
                        stats=level,
                        run_seconds=seconds,
                        queue_seconds=[max(r.started - r.enqueued, 0.0) for r in batch],
                        activity=[  # not of failed requests (NonFiniteOutputError)
                            o.per_sample_active
                            for o in outcomes
                            if isinstance(o, RunResult) and o.per_sample_active
                        ],
                    )
                )
            except Exception:  # a metrics bug must not stall the queue
                logger.exception("model %s: batch report failed", self.name)

    def _measure(self, samples: int, seconds: float) -> None:
        """Fold one run into the seconds per sample: an average over about the last
        ``_RUNS_AVERAGED`` runs, so a burst's larger batches (cheaper per sample) count soon."""
        rate = seconds / max(samples, 1)
        if self.seconds_per_sample == 0.0:
            self.seconds_per_sample = rate
        else:
            self.seconds_per_sample += (rate - self.seconds_per_sample) / _RUNS_AVERAGED

    # ---------------------------------------------------------------- shutdown

    def _check_drained(self) -> None:
        if self._drained is not None and not self._queue and self._in_flight == 0:
            self._drained.set()

    async def close(self, timeout: float) -> None:
        """Take no more requests; let queued and running ones finish (up to ``timeout``
        seconds), then free the thread."""
        self._closed = True
        self._drained = asyncio.Event()
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            logger.warning("model %s: runs still in flight at shutdown", self.name)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=False, cancel_futures=True)
