"""Prometheus metrics, written in the text exposition format (0.0.4) without a client library.

A small thread-safe registry (counters, gauges, histograms with labels, and collectors called
at scrape time) and ``ServiceMetrics``, the service's own metric families. Format reference:
https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets (seconds): from a cached metadata answer to a slow batch.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without '.0', +Inf, -Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """A metric family: name, help, label names and a lock around its children."""

    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> LabelValues:
        try:
            key = tuple([str(labels[n]) for n in self.labelnames])
        except KeyError:
            key = None
        if key is None or len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return key

    def header(self) -> list[str]:
        """The HELP and TYPE lines."""
        return [
            f"# HELP {self.name} {_escape_help(self.documentation)}",
            f"# TYPE {self.name} {self.kind}",
        ]

    def samples(self) -> list[str]:  # pragma: no cover - overridden
        """The sample lines."""
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        """Add ``amount`` (>= 0) to the child with these labels."""
        self._add(self._key(labels), amount)

    def labels(self, **labels: object) -> Callable[[float], None]:
        """``inc`` of the child with these labels, its labels looked up once (hot paths)."""
        return partial(self._add, self._key(labels))

    def _add(self, key: LabelValues, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        """The current value of one child (0 when never incremented)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        """One line per child."""
        with self._lock:
            items = sorted(self._values.items())
        return [
            f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}" for k, v in items
        ]


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: object) -> None:
        """Set the child with these labels."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def remove(self, **labels: object) -> None:
        """Forget the child with these labels (e.g. an unloaded model)."""
        with self._lock:
            self._values.pop(self._key(labels), None)

    def value(self, **labels: object) -> float | None:
        """The current value of one child, None when unset."""
        with self._lock:
            return self._values.get(self._key(labels))

    def samples(self) -> list[str]:
        """One line per child."""
        with self._lock:
            items = sorted(self._values.items())
        return [
            f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}" for k, v in items
        ]


@dataclass
class _HistogramChild:
    counts: list[int]
    total: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        if "le" in self.labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._children: dict[LabelValues, _HistogramChild] = {}

    def observe(self, value: float, **labels: object) -> None:
        """Count one observation."""
        self._observe(self._key(labels), (value,))

    def observe_many(self, values: Iterable[float], **labels: object) -> None:
        """Count several observations of the same child (one label lookup, one lock)."""
        self._observe(self._key(labels), values)

    def labels(self, **labels: object) -> Callable[[float], None]:
        """``observe`` of the child with these labels, its labels looked up once (hot
        paths)."""
        key = self._key(labels)
        return lambda value: self._observe(key, (value,))

    def _observe(self, key: LabelValues, values: Iterable[float]) -> None:
        buckets, top = self.buckets, len(self.buckets)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _HistogramChild([0] * top)
            for value in values:
                i = bisect_left(buckets, value)  # the first bound >= value
                if i < top:
                    child.counts[i] += 1
                child.total += value
                child.count += 1

    def count(self, **labels: object) -> int:
        """How many observations the child with these labels has."""
        with self._lock:
            child = self._children.get(self._key(labels))
            return child.count if child else 0

    def samples(self) -> list[str]:
        """``_bucket`` lines (cumulative, ending with +Inf), then ``_sum`` and ``_count``."""
        with self._lock:
            items = sorted((k, list(c.counts), c.total, c.count) for k, c in self._children.items())
        lines = []
        for key, counts, total, count in items:
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                le = f'le="{format_value(bound)}"'
                lines.append(
                    f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} {cumulative}"
                )
            inf = _labels_text(self.labelnames, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {count}")
            lines.append(
                f"{self.name}_sum{_labels_text(self.labelnames, key)} {format_value(total)}"
            )
            lines.append(f"{self.name}_count{_labels_text(self.labelnames, key)} {count}")
        return lines


@dataclass
class GaugeFamily:
    """A gauge family produced at scrape time by a collector."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]
    values: list[tuple[LabelValues, float]] = field(default_factory=list)

    def add(self, value: float, *labels: str) -> None:
        """Add one sample."""
        self.values.append((tuple(labels), float(value)))

    def lines(self) -> list[str]:
        """HELP, TYPE and sample lines."""
        out = [
            f"# HELP {self.name} {_escape_help(self.documentation)}",
            f"# TYPE {self.name} gauge",
        ]
        out += [
            f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}"
            for k, v in self.values
        ]
        return out


Collector = Callable[[], Iterable[GaugeFamily]]
MetricT = TypeVar("MetricT", bound=_Metric)


class MetricsRegistry:
    """Metric families in registration order, plus collectors called on every scrape."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._collectors: list[Collector] = []

    def register(self, metric: MetricT) -> MetricT:
        """Add a metric family; names must be unique."""
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics.append(metric)
        return metric

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector`` at every scrape for extra gauge families."""
        self._collectors.append(collector)

    def render(self) -> str:
        """The whole exposition, newline-terminated."""
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header()
            lines += metric.samples()
        for collector in self._collectors:
            for family in collector():
                lines += family.lines()
        return "\n".join(lines) + "\n"


class ServiceMetrics:
    """The service's metric families, one instance per app (tests get fresh ones)."""

    def __init__(self, namespace: str = "relu_serve") -> None:
        ns = namespace
        self.registry = MetricsRegistry()
        reg = self.registry.register
        self.requests = reg(
            Counter(
                f"{ns}_http_requests_total",
                "HTTP requests by route template, method, model and status class.",
                ("route", "method", "model", "status"),
            )
        )
        self.request_seconds = reg(
            Histogram(
                f"{ns}_http_request_duration_seconds",
                "Time from request start to the end of the response, by route template.",
                ("route", "method"),
            )
        )
        self.inference_seconds = reg(
            Histogram(
                f"{ns}_inference_duration_seconds",
                "Time one model run took in its worker thread, by model and statistics level.",
                ("model", "version", "stats"),
            )
        )
        self.queue_seconds = reg(
            Histogram(
                f"{ns}_inference_queue_seconds",
                "Time a model run waited for a free inference worker.",
                ("model",),
            )
        )
        self.batch_size = reg(
            Histogram(
                f"{ns}_inference_batch_size",
                "Samples per model run.",
                ("model",),
                buckets=BATCH_BUCKETS,
            )
        )
        self.model_info = reg(
            Gauge(
                f"{ns}_model_info",
                "1 for each loaded model version, with the execution provider in use and the "
                "providers requested.",
                ("model", "version", "provider", "requested"),
            )
        )
        self.model_fallback = reg(
            Gauge(
                f"{ns}_model_provider_fallback",
                "1 when the model runs on a provider other than the first one requested.",
                ("model", "version"),
            )
        )
        self.models_loaded = reg(
            Gauge(f"{ns}_models_loaded", "Model versions loaded and warmed up.")
        )
        self.ready = reg(
            Gauge(f"{ns}_ready", "1 when every model is loaded and warmed up, 0 otherwise.")
        )

    def render(self) -> str:
        """The exposition text."""
        return self.registry.render()
