"""service.core.metrics: the exposition parses strictly; /metrics reports what happened; the
metrics of several worker processes add up (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import base64
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.core import GaugeMetricFamily, Metric

from service.app import create_app
from service.core.metrics import CONTENT_TYPE, ServiceMetrics, forget_dead_workers
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import TINY_LAYERS, image_bytes, make_settings

NS = "relu_serve"
PREDICT = "/v1/models/tiny/predict"
LABELS = {"route": "/r", "method": "GET", "model": "", "status": "2xx"}

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


def test_service_metrics_render_a_strictly_valid_exposition() -> None:
    metrics = ServiceMetrics()
    metrics.requests.labels("/v1/x", "GET", "tiny", "2xx").inc()
    metrics.requests.labels('we"ird\\\nroute', "GET", "", "4xx").inc(2)
    for value in (0.0001, 0.003, 0.003, 7.0, 100.0):
        metrics.request_seconds.labels("/v1/x", "GET").observe(value)
    for size in (1, 2, 3, 300):  # a bound belongs to its own bucket (le)
        metrics.batch_size.labels("tiny").observe(size)
    metrics.ready.set(1)

    def collect() -> list[Metric]:
        family = GaugeMetricFamily(
            "app_layer_inactive_fraction", 'A "quoted"\nhelp \\ text.', labels=("model", "layer")
        )
        family.add_metric(["tiny", "features.0.act"], 0.25)
        family.add_metric(["tiny", "features.1.act"], float("nan"))
        return [family]

    metrics.add_collector(collect)
    text = metrics.render().decode()
    assert "_created" not in text  # disabled: they would double the output
    families = parse_exposition(text)
    assert families[f"{NS}_http_requests_total"].kind == "counter"
    assert sample_value(families, f"{NS}_http_requests_total", status="4xx") == 2
    # the label value escaped: backslash, quote and newline
    assert sample_value(families, f"{NS}_http_requests_total", route='we\\"ird\\\\\\nroute') == 2
    seconds = f"{NS}_http_request_duration_seconds"
    assert sample_value(families, f"{seconds}_count", route="/v1/x") == 5
    assert sample_value(families, f"{seconds}_bucket", le="0.005") == 3
    assert sample_value(families, f"{seconds}_bucket", le="+Inf") == 5
    assert sample_value(families, f"{seconds}_sum") == pytest.approx(107.0061)
    assert sample_value(families, f"{NS}_inference_batch_size_bucket", le="1.0") == 1
    assert sample_value(families, f"{NS}_inference_batch_size_bucket", le="2.0") == 2
    assert sample_value(families, f"{NS}_inference_batch_size_bucket", le="256.0") == 3
    assert sample_value(families, f"{NS}_ready") == 1
    assert sample_value(families, f"{NS}_inference_queue_length") == 0
    assert sample_value(families, "app_layer_inactive_fraction", layer="features.0.act") == 0.25
    assert math.isnan(sample_value(families, "app_layer_inactive_fraction", layer="features.1.act"))


def test_two_instances_never_mix() -> None:
    """Each app has its own registry: tests build many apps in one process."""
    first, second = ServiceMetrics(), ServiceMetrics()
    first.requests.labels("/r", "GET", "", "2xx").inc(3)
    first.ready.set(1)
    assert first.registry.get_sample_value(f"{NS}_http_requests_total", LABELS) == 3
    assert second.registry.get_sample_value(f"{NS}_http_requests_total", LABELS) is None
    assert second.registry.get_sample_value(f"{NS}_ready") == 0
    assert f"{NS}_http_requests_total{{" not in second.render().decode()


def test_collectors_run_at_every_scrape() -> None:
    metrics = ServiceMetrics()
    scrapes = []

    def collect() -> list[Metric]:
        scrapes.append(1)
        return [GaugeMetricFamily("app_scrapes", "Scrapes so far.", value=len(scrapes))]

    metrics.add_collector(collect)
    assert "app_scrapes 1.0\n" in metrics.render().decode()
    assert "app_scrapes 2.0\n" in metrics.render().decode()


def test_a_removed_model_version_loses_its_gauges() -> None:
    metrics = ServiceMetrics()
    for version in ("1", "2"):
        metrics.model_info.labels("tiny", version, "CPUExecutionProvider", "CPU").set(1)
        metrics.model_fallback.labels("tiny", version).set(0)
    metrics.remove_model("tiny", "1", "CPUExecutionProvider", "CPU")
    families = parse_exposition(metrics.render().decode())
    assert sample_value(families, f"{NS}_model_info", version="1") is None
    assert sample_value(families, f"{NS}_model_provider_fallback", version="1") is None
    assert sample_value(families, f"{NS}_model_info", version="2") == 1
    assert sample_value(families, f"{NS}_model_provider_fallback", version="2") == 0


def test_forget_dead_workers_drops_only_the_live_gauges_of_dead_pids(tmp_path: Path) -> None:
    """Files named as prometheus_client names them: <kind>[_<mode>]_<pid>.db."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    names = [
        f"counter_{dead_pid}.db",
        f"histogram_{dead_pid}.db",
        f"gauge_all_{dead_pid}.db",  # not a live mode: kept, as prometheus_client does
        f"gauge_livemin_{dead_pid}.db",
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_livemin_{live_pid}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(tmp_path) == [dead_pid]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[:3] + [names[5]])
    assert forget_dead_workers(tmp_path) == []


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


# ---------------------------------------------------------------- several worker processes

# A worker: records ``n`` requests and sets its gauges, says so, then lives until its standard
# input closes. PROMETHEUS_MULTIPROC_DIR is in its environment before prometheus_client loads.
WORKER = """
import sys
from service.core.metrics import ServiceMetrics

n, ready, queue, version = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
metrics = ServiceMetrics()
inc = metrics.requests.labels("/r", "GET", "", "2xx").inc
observe = metrics.request_seconds.labels("/r", "GET").observe
for _ in range(n):
    inc()
    observe(0.002)
metrics.ready.set(ready)
metrics.queue_length.set(queue)
metrics.models_loaded.set(1)
metrics.model_info.labels("tiny", version, "CPUExecutionProvider", "CPU").set(1)
if version != "1":
    metrics.remove_model("tiny", "1", "CPUExecutionProvider", "CPU")
print("recorded", flush=True)
sys.stdin.read()
"""
# The worker that answers a scrape: ready, nothing recorded.
SCRAPER = """
import sys
from service.core.metrics import ServiceMetrics

metrics = ServiceMetrics()
metrics.ready.set(1)
sys.stdout.buffer.write(metrics.render())
"""


def _python(code: str, *args: object, folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[3],  # the repository root: `service` imports
    )


def _scrape(folder: Path) -> dict[str, Family]:
    scraper = _python(SCRAPER, folder=folder)
    out, _ = scraper.communicate(timeout=30)
    assert scraper.returncode == 0
    return parse_exposition(out)


def test_workers_add_up_and_a_dead_workers_live_gauges_go(tmp_path: Path) -> None:
    """Two workers record requests; one dies; a third one's scrape still counts the dead
    one's requests, but no longer its readiness, queue or model version."""
    # The first is still loading (not ready) and serves version 1; the second removed it.
    first = _python(WORKER, 3, 0, 2, "1", folder=tmp_path)
    second = _python(WORKER, 5, 1, 4, "2", folder=tmp_path)
    try:
        for worker in (first, second):
            assert worker.stdout is not None
            assert worker.stdout.readline() == "recorded\n"
        both = _scrape(tmp_path)
        assert sample_value(both, f"{NS}_http_requests_total", route="/r") == 8
        assert sample_value(both, f"{NS}_http_request_duration_seconds_count") == 8
        assert sample_value(both, f"{NS}_http_request_duration_seconds_bucket", le="0.0025") == 8
        assert sample_value(both, f"{NS}_ready") == 0  # livemin: one worker is not ready
        assert sample_value(both, f"{NS}_inference_queue_length") == 6  # livesum
        assert sample_value(both, f"{NS}_models_loaded") == 1  # livemax, not a sum
        assert sample_value(both, f"{NS}_model_info", version="1") == 1  # the first serves it
        assert sample_value(both, f"{NS}_model_info", version="2") == 1
        for family in both.values():  # no pid label leaks out of the merge
            assert all("pid" not in labels for _, labels, _ in family.samples)

        first.communicate(timeout=30)  # its standard input closes: it exits
        assert first.returncode == 0
        dead = forget_dead_workers(tmp_path)  # the first and the first scraper
        assert first.pid in dead
        assert second.pid not in dead
        assert not list(tmp_path.glob(f"gauge_live*_{first.pid}.db"))
        assert (tmp_path / f"counter_{first.pid}.db").exists()

        after = _scrape(tmp_path)
        assert sample_value(after, f"{NS}_http_requests_total", route="/r") == 8
        assert sample_value(after, f"{NS}_http_request_duration_seconds_count") == 8
        assert sample_value(after, f"{NS}_ready") == 1
        assert sample_value(after, f"{NS}_inference_queue_length") == 4
        assert sample_value(after, f"{NS}_model_info", version="1") == 0  # gone everywhere
        assert sample_value(after, f"{NS}_model_info", version="2") == 1
    finally:
        for worker in (first, second):
            if worker.poll() is None:
                worker.communicate(timeout=30)


def test_a_scrape_forgets_workers_that_died_without_a_word(tmp_path: Path) -> None:
    """A worker killed outright: the next scrape (the scraper's start or render) drops its
    readiness."""
    worker = _python(WORKER, 2, 0, 1, "1", folder=tmp_path)
    assert worker.stdout is not None
    assert worker.stdout.readline() == "recorded\n"
    worker.kill()
    worker.communicate(timeout=30)
    families = _scrape(tmp_path)
    assert sample_value(families, f"{NS}_ready") == 1
    assert sample_value(families, f"{NS}_inference_queue_length") == 0
    assert sample_value(families, f"{NS}_http_requests_total", route="/r") == 2


def test_a_folder_set_too_late_is_refused(tmp_path: Path) -> None:
    """prometheus_client chooses memory-mapped values at its import: a folder named after it
    would stay empty, and every scrape would say nothing. The worker refuses to start."""
    late = f"""
import os
import prometheus_client
os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
from service.core.metrics import ServiceMetrics
ServiceMetrics()
"""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", late],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        timeout=30,
    )
    assert result.returncode != 0
    assert "was set after prometheus_client was imported" in result.stderr


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
    assert sample_value(scraped, f"{NS}_inference_batch_size_bucket", model="tiny", le="2.0") == 1
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
        # 3 samples, fewer than monitor_min_samples: dead units are not claimed (no sample)
        dead = sample_value(scraped, f"{NS}_activation_dead_units", model="tiny", layer=layer)
        assert dead is None
    assert sample_value(scraped, f"{NS}_monitor_window_samples", model="tiny") == 3
    assert sample_value(scraped, f"{NS}_monitor_samples_total", model="tiny", version="2") == 3
    for layer in TINY_LAYERS:  # counters per channel of the monitored (default) version
        labels = {"model": "tiny", "version": "2", "layer": layer, "channel": "0"}
        active = sample_value(scraped, f"{NS}_activation_channel_active_samples_total", **labels)
        activity = sample_value(scraped, f"{NS}_activation_channel_activity_total", **labels)
        assert active is not None
        assert activity is not None
        assert 0 <= activity <= active <= 3
