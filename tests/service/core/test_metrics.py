"""service.core.metrics: the exposition parses strictly; /metrics reports what happened."""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core.metrics import (
    CONTENT_TYPE,
    Counter,
    Gauge,
    GaugeFamily,
    Histogram,
    MetricsRegistry,
    format_value,
)
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import TINY_LAYERS, image_bytes, make_settings

NS = "relu_serve"
PREDICT = "/v1/models/tiny/predict"

# The text format 0.0.4 grammar, strictly:
# https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]Inf|NaN)"
SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*)?\}})? ({_VALUE})(?: -?\d+)?$")
HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


@dataclass
class Family:
    """One parsed metric family."""

    name: str
    kind: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse strictly; fail on anything the Prometheus text format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    helped: set[str] = set()
    seen_series: set[tuple[str, tuple]] = set()
    current: Family | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        if line.startswith("# HELP "):
            match = HELP.match(line)
            assert match, f"line {number}: bad HELP: {line!r}"
            assert match.group(1) not in helped, f"line {number}: HELP twice"
            helped.add(match.group(1))
            continue
        if line.startswith("# TYPE "):
            match = TYPE.match(line)
            assert match, f"line {number}: bad TYPE: {line!r}"
            name = match.group(1)
            assert name not in families, f"line {number}: family {name} declared twice"
            current = families[name] = Family(name, match.group(2))
            continue
        assert not line.startswith("#"), f"line {number}: stray comment {line!r}"
        match = SAMPLE.match(line)
        assert match, f"line {number}: bad sample line: {line!r}"
        name, labels_text, value = match.group(1), match.group(2) or "", match.group(3)
        assert current is not None, f"line {number}: sample before any TYPE"
        allowed = {current.name}
        if current.kind == "histogram":
            allowed = {f"{current.name}_{s}" for s in ("bucket", "sum", "count")}
        assert name in allowed, f"line {number}: {name} outside its family {current.name}"
        labels = dict(LABEL_PAIR.findall(labels_text))
        series = (name, tuple(sorted(labels.items())))
        assert series not in seen_series, f"line {number}: duplicate series {series}"
        seen_series.add(series)
        current.samples.append((name, labels, float(value.replace("Inf", "inf"))))
    for family in families.values():
        if family.kind == "histogram":
            _check_histogram(family)
        if family.kind == "counter":
            assert family.name.endswith("_total"), f"counter {family.name} must end in _total"
    return families


def _check_histogram(family: Family) -> None:
    """Buckets cumulative and ending with +Inf equal to _count, for every label set."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    counts: dict[tuple, float] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            groups.setdefault(key, []).append((float(labels["le"].replace("Inf", "inf")), value))
        elif name.endswith("_count"):
            counts[key] = value
    for key, buckets in groups.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds), f"{family.name}: buckets out of order"
        assert math.isinf(bounds[-1]), f"{family.name}: no +Inf bucket"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{family.name}: buckets not cumulative"
        assert values[-1] == counts[key], f"{family.name}: +Inf bucket != _count"


def sample_value(families: dict[str, Family], name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``."""
    for family in families.values():
        for sample_name, sample_labels, value in family.samples:
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
    return None


def test_registry_renders_a_strictly_valid_exposition() -> None:
    registry = MetricsRegistry()
    requests = registry.register(Counter("app_requests_total", "Requests.", ("route", "code")))
    temperature = registry.register(Gauge("app_temperature", 'A "quoted"\nhelp \\ text.'))
    latency = registry.register(Histogram("app_latency_seconds", "Latency.", ("route",)))
    requests.inc(route="/v1/x", code="2xx")
    requests.inc(2, route='we"ird\\\nroute', code="4xx")
    temperature.set(-3.5)
    for value in (0.0001, 0.003, 0.003, 7.0, 100.0):
        latency.observe(value, route="/v1/x")

    def collect() -> list[GaugeFamily]:
        family = GaugeFamily("app_layer_inactive_fraction", "Per layer.", ("model", "layer"))
        family.add(0.25, "tiny", "features.0.act")
        family.add(float("nan"), "tiny", "features.1.act")
        return [family]

    registry.add_collector(collect)
    families = parse_exposition(registry.render())
    assert families["app_requests_total"].kind == "counter"
    assert sample_value(families, "app_requests_total", code="4xx") == 2
    assert sample_value(families, "app_temperature") == -3.5
    assert sample_value(families, "app_latency_seconds_count", route="/v1/x") == 5
    assert sample_value(families, "app_latency_seconds_bucket", le="0.005") == 3
    assert sample_value(families, "app_latency_seconds_bucket", le="+Inf") == 5
    assert sample_value(families, "app_latency_seconds_sum") == pytest.approx(107.0061)
    assert sample_value(families, "app_layer_inactive_fraction", layer="features.0.act") == 0.25
    assert math.isnan(sample_value(families, "app_layer_inactive_fraction", layer="features.1.act"))


def test_registry_refuses_misuse() -> None:
    registry = MetricsRegistry()
    counter = registry.register(Counter("x_total", "X.", ("a",)))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("x_total", "X again."))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(b="1")
    with pytest.raises(ValueError, match="only go up"):
        counter.inc(-1, a="1")
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "H.", ("le",))


def test_histogram_buckets_and_bulk_observations() -> None:
    one_by_one = Histogram("h", "H.", ("m",), buckets=(0.1, 1.0))
    bulk = Histogram("h", "H.", ("m",), buckets=(0.1, 1.0))
    values = [0.05, 0.1, 0.5, 1.0, 7.0]  # a bound belongs to its own bucket (le)
    for value in values:
        one_by_one.observe(value, m="a")
    bulk.observe_many(values, m="a")
    assert one_by_one.samples() == bulk.samples()
    lines = dict(line.rsplit(" ", 1) for line in bulk.samples())
    assert lines['h_bucket{m="a",le="0.1"}'] == "2"
    assert lines['h_bucket{m="a",le="1"}'] == "4"
    assert lines['h_bucket{m="a",le="+Inf"}'] == "5"
    assert lines['h_count{m="a"}'] == "5"
    with pytest.raises(ValueError, match="takes labels"):
        bulk.observe_many([1.0], other="a")


def test_bound_children_count_like_labelled_calls() -> None:
    by_labels, bound = Counter("c", "C.", ("m",)), Counter("c", "C.", ("m",))
    hist_by_labels = Histogram("h", "H.", ("m",), buckets=(0.1, 1.0))
    hist_bound = Histogram("h", "H.", ("m",), buckets=(0.1, 1.0))
    inc, observe = bound.labels(m="a"), hist_bound.labels(m="a")
    for value in (0.05, 0.1, 2.0):
        by_labels.inc(value, m="a")
        inc(value)
        hist_by_labels.observe(value, m="a")
        observe(value)
    assert bound.samples() == by_labels.samples() == ['c{m="a"} 2.15']
    assert hist_bound.samples() == hist_by_labels.samples()
    with pytest.raises(ValueError, match="only go up"):
        inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        hist_bound.labels(other="a")


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.0, "1"), (0.25, "0.25"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (3, "3")],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_the_strict_parser_rejects_bad_expositions() -> None:
    """The checker must be able to fail, or the app tests prove nothing."""
    bad = [
        "x 1",  # no trailing newline
        "x 1\n",  # sample without TYPE
        "# TYPE x gauge\nx{a=b} 1\n",  # unquoted label value
        "# TYPE x gauge\nx 1\nx 2\n",  # duplicate series
        "# TYPE x counter\nx 1\n",  # counter without _total
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 1\n',
    ]
    for text in bad:
        with pytest.raises(AssertionError):
            parse_exposition(text)


# ---------------------------------------------------------------- the app's /metrics


@pytest.fixture(scope="module")
def scraped(model_repo: Path) -> dict[str, Family]:
    """Families scraped from an app after a few good and bad requests."""
    with TestClient(create_app(make_settings(model_repo))) as client:
        x = reference_inputs(3)
        body = {"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}}
        assert client.post(PREDICT, json=body).status_code == 200
        assert client.post(PREDICT, params={"stats": "summary"}, json=body).status_code == 200
        assert client.post(PREDICT, files={"file": ("a", image_bytes())}).status_code == 200
        assert client.post(PREDICT, files={"file": ("b", b"junk")}).status_code == 415
        assert client.post("/v1/models/no-such-model/predict", json=body).status_code == 404
        assert client.get("/v1/no/route").status_code == 404
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse_exposition(response.text)


def test_requests_are_counted_by_route_model_and_status_class(scraped: dict) -> None:
    route = "/v1/models/{name}/predict"
    assert (
        sample_value(scraped, f"{NS}_http_requests_total", route=route, model="tiny", status="2xx")
        == 3
    )
    assert (
        sample_value(scraped, f"{NS}_http_requests_total", route=route, model="tiny", status="4xx")
        == 1
    )
    # an unknown model's name is not a label value (unbounded cardinality): it counts as ""
    assert (
        sample_value(scraped, f"{NS}_http_requests_total", route=route, model="", status="4xx") == 1
    )
    assert sample_value(scraped, f"{NS}_http_requests_total", route="unmatched", status="4xx") == 1
    count = sample_value(scraped, f"{NS}_http_request_duration_seconds_count", route=route)
    assert count == 5


def test_inference_histograms(scraped: dict) -> None:
    runs = sample_value(
        scraped, f"{NS}_inference_duration_seconds_count", model="tiny", stats="none"
    )
    assert runs == 2
    assert (
        sample_value(
            scraped, f"{NS}_inference_duration_seconds_count", model="tiny", stats="summary"
        )
        == 1
    )
    assert sample_value(scraped, f"{NS}_inference_batch_size_bucket", model="tiny", le="2") == 1
    assert sample_value(scraped, f"{NS}_inference_batch_size_count", model="tiny") == 3
    assert sample_value(scraped, f"{NS}_inference_queue_seconds_count", model="tiny") == 3


def test_provider_and_fallback_per_model(scraped: dict) -> None:
    for model, version in (("tiny", "1"), ("tiny", "2"), ("foreign", "1")):
        info = sample_value(
            scraped,
            f"{NS}_model_info",
            model=model,
            version=version,
            provider="CPUExecutionProvider",
        )
        assert info == 1
        assert (
            sample_value(scraped, f"{NS}_model_provider_fallback", model=model, version=version)
            == 0
        )
    assert sample_value(scraped, f"{NS}_ready") == 1
    assert sample_value(scraped, f"{NS}_models_loaded") == 3


def test_activation_gauges_from_the_monitor(scraped: dict) -> None:
    for layer in TINY_LAYERS:
        inactive = sample_value(
            scraped, f"{NS}_activation_inactive_fraction", model="tiny", layer=layer
        )
        assert inactive is not None
        assert 0.0 <= inactive <= 1.0
        assert (
            sample_value(scraped, f"{NS}_activation_drift_score", model="tiny", layer=layer)
            is not None
        )
        assert (
            sample_value(scraped, f"{NS}_activation_dead_units", model="tiny", layer=layer)
            is not None
        )
    assert sample_value(scraped, f"{NS}_monitor_window_samples", model="tiny") == 3
    assert sample_value(scraped, f"{NS}_monitor_samples_total", model="tiny", version="2") == 3
    for layer in TINY_LAYERS:  # counters per channel of the monitored (default) version
        labels = {"model": "tiny", "version": "2", "layer": layer, "channel": "0"}
        active = sample_value(scraped, f"{NS}_activation_channel_active_samples_total", **labels)
        activity = sample_value(scraped, f"{NS}_activation_channel_activity_total", **labels)
        assert active is not None
        assert activity is not None
        assert 0 <= activity <= active <= 3
