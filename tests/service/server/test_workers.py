"""Several worker processes for real: ``python -m service`` with two workers on one port, under
concurrent clients, as one service (docs/deployment.md, "Workers").

A worker killed with SIGKILL is replaced and only the requests in flight on it fail; the
requests of many connections land on both workers; what a client reads (the live monitor,
/metrics, the models served) adds up over the workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_helpers import uvicorn_server
from tests.service.conftest import make_onnx_cnn
from tests.service.http_helpers import predict_body

pytestmark = [pytest.mark.network, pytest.mark.slow]

CLIENTS = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")


def workers_of(master: int) -> list[int]:
    """The worker processes uvicorn's supervisor started (multiprocessing's spawned
    children; not its resource tracker)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def two_workers(model_repo: Path) -> Iterator[tuple[str, int]]:
    """``(url, master pid)`` of the service with two workers, both serving."""
    with uvicorn_server(model_repo, env={"RELU_SERVE_WORKERS": "2"}) as (url, process):
        wait_for(lambda: len(workers_of(process.pid)) == 2, 30, "two workers")
        yield url, process.pid


class Load:
    """``CLIENTS`` threads sending predict requests, each on a new connection (to one of
    ``urls`` in turn), until stopped; records every outcome (status code or exception name)
    with its end time, and the version that answered."""

    def __init__(self, *urls: str) -> None:
        self.urls = [f"{url}/v1/models/tiny/predict" for url in urls]
        self.outcomes: list[tuple[float, str]] = []
        self.versions: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]
        self._lock = threading.Lock()

    def _client(self) -> None:
        body, headers = predict_body(), {"Content-Type": "application/json"}
        sent = 0
        while not self._stop.is_set():
            url = self.urls[sent % len(self.urls)]
            sent += 1
            version = None
            try:
                response = httpx.post(url, content=body, headers=headers, timeout=10)
                status = str(response.status_code)
                if response.status_code == 200:
                    version = response.json()["model"]["version"]
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with self._lock:
                now = time.monotonic()
                self.outcomes.append((now, status))
                if version is not None:
                    self.versions.append((now, version))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def since(self, moment: float) -> list[str]:
        with self._lock:
            return [status for at, status in self.outcomes if at >= moment]

    def versions_since(self, moment: float) -> set[str]:
        with self._lock:
            return {version for at, version in self.versions if at >= moment}


def test_a_killed_worker_is_replaced_and_only_its_requests_in_flight_fail(
    two_workers: tuple[str, int],
) -> None:
    url, master = two_workers
    victim, survivor = workers_of(master)
    with Load(url) as load:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(workers_of(master)) == 2 and victim not in workers_of(master),
            30,
            "a replacement worker",
        )
        replacement = next(pid for pid in workers_of(master) if pid != survivor)
        # Served on, through the replacement too: readiness of both, then more requests.
        wait_for(lambda: httpx.get(f"{url}/health/ready").status_code == 200, 30, "ready")
        time.sleep(2)
        after_restart = time.monotonic()
        time.sleep(1)
    during = load.since(killed_at)
    failed = [status for status in during if status != "200"]
    # At most the requests in flight on the killed worker: one per client.
    assert len(failed) <= CLIENTS, failed
    assert during.count("200") > len(failed)
    assert set(load.since(after_restart)) == {"200"}
    assert survivor in workers_of(master)
    assert cpu_seconds(replacement) > 0


KEY = "workers-test-management-key-0123"
POLL_S = 0.5


@pytest.fixture
def repository(model_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of the fixture repository (tiny versions 1 and 2)."""
    copy = tmp_path / "models"
    shutil.copytree(model_repo, copy)
    return copy


def managed(workers: int, **env: str) -> dict[str, str]:
    return {
        "RELU_SERVE_WORKERS": str(workers),
        "RELU_SERVE_MANAGEMENT_API_KEY": KEY,
        "RELU_SERVE_REPOSITORY_POLL_S": str(POLL_S),
        **env,
    }


def upload_under_load(urls: list[str], version: str) -> None:
    """Upload a new version of tiny through the first URL while 8 clients send requests to
    all: none fails, and within the poll bound every answer names the new version."""
    data = make_onnx_cnn(name="tiny", seed=21).SerializeToString()
    with Load(*urls) as load:
        wait_for(lambda: len(load.versions_since(0)) > 0, 20, "answers before the upload")
        assert load.versions_since(0) == {"2"}, load.since(0)[:5]
        response = httpx.put(
            f"{urls[0]}/v1/admin/models/tiny/versions/{version}",
            content=data,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        answered = time.monotonic()
        # The poll interval, plus loading and warming the model up in each worker.
        time.sleep(POLL_S + 2)
        settled = time.monotonic()
        time.sleep(1.5)
    assert set(load.since(0)) == {"200"}, "a request failed during the upload"
    assert load.versions_since(answered - 0.1) >= {version}
    assert load.versions_since(settled) == {version}


def test_an_upload_through_one_worker_reaches_every_worker(repository: Path) -> None:
    with uvicorn_server(repository, env=managed(2)) as (url, process):
        wait_for(lambda: len(workers_of(process.pid)) == 2, 30, "two workers")
        upload_under_load([url], "3")


def test_two_instances_on_one_repository_converge(repository: Path) -> None:
    # As two replicas on a shared volume: separate processes, nothing shared but the folder.
    with (
        uvicorn_server(repository, env=managed(1)) as (first, _),
        uvicorn_server(repository, env=managed(1)) as (second, _),
    ):
        upload_under_load([first, second], "3")


def test_a_restart_keeps_the_default_version_set_at_run_time(repository: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with uvicorn_server(repository, env=managed(2)) as (url, _):
        response = httpx.put(
            f"{url}/v1/admin/models/tiny/default", json={"version": 1}, headers=auth
        )
        assert response.status_code == 200, response.text
    with uvicorn_server(repository, env=managed(2)) as (url, _):
        with Load(url) as load:
            time.sleep(1)
        assert load.versions_since(0) == {"1"}


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total


def test_requests_spread_over_both_workers_and_metrics_count_them_all(
    two_workers: tuple[str, int],
) -> None:
    url, master = two_workers
    workers = workers_of(master)
    before = {pid: cpu_seconds(pid) for pid in workers}
    with Load(url) as load:
        time.sleep(3)
    used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
    sent = len(load.since(0))
    assert set(load.since(0)) == {"200"}
    # Each worker does a fair part of the work (the bound is 35-65% at 64 clients).
    total = sum(used.values())
    assert all(0.2 <= seconds / total <= 0.8 for seconds in used.values()), used
    # /metrics, whichever worker answers, counts the requests of both.
    text = httpx.get(f"{url}/metrics").text
    route = "/v1/models/{name}/predict"
    counted = metric_sum(text, "relu_serve_http_requests_total", route=route, status="2xx")
    assert counted == sent
    assert metric_sum(text, "relu_serve_http_request_duration_seconds_count", route=route) == sent
    assert metric_sum(text, "relu_serve_ready") == 1


def monitored(url: str, requests: int) -> dict[str, Any]:
    """Send ``requests`` predict requests with statistics (distinct inputs, 3 samples each),
    each on a new connection from 8 threads; the live monitor's answer afterwards."""
    bodies = [predict_body(3, seed=seed) for seed in range(requests)]

    def send(body: bytes) -> int:
        response = httpx.post(
            f"{url}/v1/models/tiny/predict?stats=summary",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        return response.status_code

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert set(pool.map(send, bodies)) == {200}
    response = httpx.get(f"{url}/v1/models/tiny/activations")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_monitor_adds_up_over_workers(model_repo: Path) -> None:
    # The same requests, to two workers and to one process: the same samples and per-channel
    # activity, whichever worker took which request and whichever answers the monitor.
    requests = 40
    with uvicorn_server(model_repo, env={"RELU_SERVE_WORKERS": "2"}) as (url, process):
        workers = workers_of(process.pid)
        before = {pid: cpu_seconds(pid) for pid in workers}
        merged = monitored(url, requests)
        assert all(cpu_seconds(pid) > before[pid] for pid in workers)
        again = [httpx.get(f"{url}/v1/models/tiny/activations").json() for _ in range(6)]
    with uvicorn_server(model_repo) as (url, _):
        alone = monitored(url, requests)
    assert merged["samples"] == alone["samples"] == 3 * requests
    for layer, reference in zip(merged["layers"], alone["layers"], strict=True):
        assert layer["name"] == reference["name"]
        assert layer["channel_activity"] == pytest.approx(reference["channel_activity"], abs=1e-12)
        assert layer["inactive_fraction"] == pytest.approx(reference["inactive_fraction"])
    # Every worker answers the same.
    assert all(snapshot["layers"] == again[0]["layers"] for snapshot in again)
