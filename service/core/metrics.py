"""Prometheus metrics on ``prometheus_client``: the service's metric families, one process or many.

``ServiceMetrics`` holds the counters, gauges and histograms the code updates, in a registry of
its own (two apps in one process, as in the tests, never mix), and the collectors computed at
scrape time (``add_collector``). Its ``render`` is the ``/metrics`` answer.

Several workers (``python -m service`` with ``workers`` > 1) share the answer through
prometheus_client's multiprocess mode: the master exports ``PROMETHEUS_MULTIPROC_DIR``, a fresh
folder, before the workers start, and prometheus_client, reading it at import, keeps every
value in a memory-mapped file per process there. A scrape then reads all of them
(``MultiProcessCollector``) instead of this process's own registry, which would count its
values twice. Counters and histograms of workers that died stay counted; the ``live*`` gauges
of dead workers are dropped (``forget_dead_workers``). Reference:
https://prometheus.github.io/client_python/multiprocess/
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

logger = logging.getLogger(__name__)

# generate_latest writes the text format 0.0.4 for names like ours; prometheus_client's
# CONTENT_TYPE_LATEST says version=1.0.0 in recent releases, so the header stays ours.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets (seconds): from a cached metadata answer to a slow batch.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The folder of the multiprocess files, read once at import as prometheus_client itself does
# (its values are memory-mapped or not from its import on); None in a single process.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

# No ``_created`` series next to each counter and histogram: they double the output and
# Prometheus does not need them (the multiprocess collector never writes them anyway).
prometheus_client.disable_created_metrics()

CollectFunction = Callable[[], Iterable[Metric]]


class _FunctionCollector:
    """A collector (``collect()``) around a function called at every scrape."""

    def __init__(self, collect: CollectFunction) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        """The function's metric families."""
        return self._collect()


class ServiceMetrics:
    """The service's metric families, one instance per app (tests get fresh ones).

    In multiprocess mode there is one instance per worker process; each gauge's
    ``multiprocess_mode`` says how the workers' values merge.
    """

    def __init__(self, namespace: str = "relu_serve") -> None:
        ns = namespace
        self.multiprocess_dir = MULTIPROCESS_DIR
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            f"{ns}_http_requests_total",
            "HTTP requests by route template, method, model and status class.",
            ("route", "method", "model", "status"),
            registry=reg,
        )
        self.request_seconds = Histogram(
            f"{ns}_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ("route", "method"),
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.inference_seconds = Histogram(
            f"{ns}_inference_duration_seconds",
            "Time one model run took in its worker thread, by model and statistics level.",
            ("model", "version", "stats"),
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_seconds = Histogram(
            f"{ns}_inference_queue_seconds",
            "Time a model run waited for a free inference worker.",
            ("model",),
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            f"{ns}_inference_batch_size",
            "Samples per model run.",
            ("model",),
            registry=reg,
            buckets=BATCH_BUCKETS,
        )
        # A version counts while any live worker serves it (workers converge after a change).
        self.model_info = Gauge(
            f"{ns}_model_info",
            "1 for each loaded model version, with the execution provider in use and the "
            "providers requested.",
            ("model", "version", "provider", "requested"),
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.model_fallback = Gauge(
            f"{ns}_model_provider_fallback",
            "1 when the model runs on a provider other than the first one requested.",
            ("model", "version"),
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.models_loaded = Gauge(
            f"{ns}_models_loaded",
            "Model versions loaded and warmed up.",
            registry=reg,
            multiprocess_mode="livemax",
        )
        # Ready only when every live worker is: one still loading (0) makes the service 0.
        self.ready = Gauge(
            f"{ns}_ready",
            "1 when every model is loaded and warmed up, 0 otherwise.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        # Each worker has its own queues: the service's length is their sum.
        self.queue_length = Gauge(
            f"{ns}_inference_queue_length",
            "Requests waiting for or in a model run (all models).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        if self.multiprocess_dir is None:
            self._exposed = self.registry
        else:
            # The scrape reads every worker's files; this process's registry is in them.
            own = Path(self.multiprocess_dir) / f"gauge_livemin_{os.getpid()}.db"  # ``ready``'s
            if not own.exists():
                raise RuntimeError(
                    f"PROMETHEUS_MULTIPROC_DIR={self.multiprocess_dir} was set after "
                    "prometheus_client was imported, or the folder is missing: the metrics "
                    "would not reach it; set it before the process starts"
                )
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=self.multiprocess_dir)
            forget_dead_workers(self.multiprocess_dir)  # a new worker cleans up after the dead

    def add_collector(self, collect: CollectFunction) -> None:
        """Call ``collect()`` at every scrape; it returns prometheus_client metric families
        (``GaugeMetricFamily`` ...) computed then. Their names must not clash with the
        families above."""
        self._exposed.register(_FunctionCollector(collect))

    def remove_model(self, name: str, version: str, provider: str, requested: str) -> None:
        """Drop the gauges of a model version no longer loaded. Multiprocess files cannot
        drop a series, so there both go to 0 (``model_info`` 0: not loaded here)."""
        if self.multiprocess_dir is None:
            self.model_info.remove(name, version, provider, requested)
            self.model_fallback.remove(name, version)
        else:
            self.model_info.labels(name, version, provider, requested).set(0)
            self.model_fallback.labels(name, version).set(0)

    def render(self) -> bytes:
        """The exposition text (format 0.0.4): every worker's in multiprocess mode."""
        if self.multiprocess_dir is not None:
            forget_dead_workers(self.multiprocess_dir)
        return generate_latest(self._exposed)


def forget_dead_workers(path: str | Path) -> list[int]:
    """Drop the ``live*`` gauge files of processes that are gone; return their pids.

    uvicorn's supervisor has no hook when a worker exits (gunicorn's ``child_exit``), so each
    worker does it, at start and at every scrape. Counters and histograms of dead workers stay:
    they counted real requests. A pid reused by another process is taken for alive.
    """
    pids = set()
    for file in Path(path).glob("gauge_live*.db"):
        digits = file.stem.rpartition("_")[2]  # gauge_<mode>_<pid>.db
        if digits.isdigit():
            pids.add(int(digits))
    dead = [pid for pid in sorted(pids) if not _alive(pid)]
    for pid in dead:
        mark_process_dead(pid, str(path))
    if dead:
        logger.info("metrics: dropped the live gauges of dead worker(s) %s", dead)
    return dead


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
