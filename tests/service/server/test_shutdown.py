"""Graceful shutdown for real: a uvicorn process started as ``scripts/serve`` starts it, under
concurrent load, gets SIGTERM.

What must happen (``service/server/shutdown.py``): readiness answers 503 at once while requests are
still served for ``RELU_SERVE_SHUTDOWN_DELAY_S``; then uvicorn stops accepting (new
connections are refused), requests in flight finish with 200, and the process exits 0 within
the delay plus ``--timeout-graceful-shutdown``.

The clients behave like a load balancer: they stop starting requests once they have seen
the 503 (as Kubernetes takes a pod out of its endpoints). Requests that span the stop itself
are slow uploads, whose bodies trickle in across the moment uvicorn closes its listener.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_helpers import uvicorn_server
from tests.service.http_helpers import predict_body

pytestmark = [pytest.mark.network, pytest.mark.slow]

DELAY_S = 1.5  # RELU_SERVE_SHUTDOWN_DELAY_S
GRACE_S = 10  # uvicorn --timeout-graceful-shutdown
CLIENTS = 8
MAX_REQUESTS_PER_CLIENT = 2_000  # bounds the load whatever happens
SLOW_UPLOADS = 3
SLOW_UPLOAD_S = 1.2  # each slow body trickles in over this long


@dataclass
class Outcome:
    started: float
    ended: float
    result: str  # "200", another status, "refused", or the exception's type name


def classify(exc: Exception) -> str:
    return "refused" if isinstance(exc, httpx.ConnectError) else type(exc).__name__


@pytest.fixture(params=[1, 2], ids=["1 worker", "2 workers"])
def server_process(
    model_repo: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m service`` with the command line of ``scripts/serve`` on 127.0.0.1, in one
    process or with two workers (then SIGTERM goes to uvicorn's supervisor, which stops each
    worker as one process stops)."""
    env = {
        "RELU_SERVE_SHUTDOWN_DELAY_S": str(DELAY_S),
        "RELU_SERVE_LOG_LEVEL": "info",
        "RELU_SERVE_WORKERS": str(request.param),
    }
    args = ["--timeout-graceful-shutdown", str(GRACE_S)]
    with uvicorn_server(model_repo, env=env, args=args) as (url, process):
        yield process, url


def test_sigterm_under_load_fails_no_request_in_flight(server_process) -> None:
    process, base = server_process
    url = f"{base}/v1/models/tiny/predict"
    body = predict_body()
    headers = {"Content-Type": "application/json", "Connection": "close"}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    drained = threading.Event()  # the "load balancer" has seen readiness 503
    readiness: list[tuple[float, str]] = []  # (when the answer came, status)
    asked: list[float] = []  # when each of those polls was sent

    def record(started: float, result: str) -> None:
        with lock:
            outcomes.append(Outcome(started, time.monotonic(), result))

    def client() -> None:
        # A new connection each request: no keep-alive connection can be closed under it.
        with httpx.Client(timeout=GRACE_S + 5) as http:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if drained.is_set():
                    return
                started = time.monotonic()
                try:
                    response = http.post(url, content=body, headers=headers)
                    ok = response.status_code == 200 and response.json()["predictions"]
                    record(started, "200" if ok else str(response.status_code))
                except httpx.HTTPError as exc:
                    record(started, classify(exc))

    def slow_upload() -> None:
        def trickle() -> Iterator[bytes]:
            pieces = np.array_split(np.frombuffer(body, np.uint8), 6)
            for piece in pieces:
                yield piece.tobytes()
                time.sleep(SLOW_UPLOAD_S / len(pieces))

        started = time.monotonic()
        try:
            response = httpx.post(url, content=trickle(), headers=headers, timeout=GRACE_S + 5)
            record(started, str(response.status_code))
        except httpx.HTTPError as exc:
            record(started, classify(exc))

    def poll_readiness() -> None:
        with httpx.Client(timeout=2) as http:
            while process.poll() is None:
                asked.append(time.monotonic())
                try:
                    status = str(http.get(f"{base}/health/ready").status_code)
                except httpx.HTTPError as exc:
                    status = classify(exc)
                readiness.append((time.monotonic(), status))
                if status != "200":
                    drained.set()
                if status == "refused":
                    return
                time.sleep(0.05)

    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)  # load running
    with lock:
        before = len(outcomes)
    assert before > 0, "no request completed before SIGTERM"

    poller = threading.Thread(target=poll_readiness)
    poller.start()
    sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # The delay runs from when the server heard of it: at once for one process; with
    # workers, when uvicorn's supervisor passes it on (it looks at signals every 0.5 s).
    assert drained.wait(5), "readiness did not turn 503"
    # The server heard of it after it last answered 200 (an answer slow under load does
    # not move this later).
    # (``asked`` may hold one more poll, still waiting for its answer.)
    polls = zip(asked, readiness, strict=False)
    last_200 = max([at for at, (_, status) in polls if status == "200"], default=0.0)
    heard_at = max(sigterm_at, last_200)

    # Slow uploads start shortly before the delay ends, so uvicorn stops accepting while
    # their bodies are still arriving.
    time.sleep(max(0.0, heard_at + DELAY_S - 0.4 - time.monotonic()))
    uploads = [threading.Thread(target=slow_upload) for _ in range(SLOW_UPLOADS)]
    for thread in uploads:
        thread.start()
    time.sleep(0.4 + 0.3)  # past the delay: uvicorn has closed its listener
    alive_while_draining = process.poll() is None
    try:
        httpx.get(f"{base}/health/live", timeout=2)
        new_connection = "accepted"
    except httpx.HTTPError as exc:
        new_connection = classify(exc)

    try:
        code = process.wait(timeout=DELAY_S + GRACE_S + 5)
    except subprocess.TimeoutExpired:
        pytest.fail("server did not exit within the delay plus the graceful timeout")
    exited_after = time.monotonic() - sigterm_at
    for thread in [*clients, *uploads, poller]:
        thread.join(timeout=30)
    output = process.stdout.read().decode() if process.stdout else ""

    # The process: exit status 0, after the delay, well within delay + graceful timeout.
    assert code == 0, output
    assert DELAY_S <= exited_after < DELAY_S + GRACE_S, (exited_after, output)
    assert "Application shutdown complete." in output, output

    # Readiness: 503 at once after SIGTERM, never 200 again, then connections refused.
    # (Workers hear of it from uvicorn's supervisor, which looks at signals every 0.5 s.)
    one_process = "Started parent process" not in output
    after = [status for at, status in readiness if at >= sigterm_at]
    assert after, "readiness never polled after SIGTERM"
    if one_process:
        assert after[0] == "503", readiness
    first_503 = next(at for at, status in readiness if status == "503")
    assert "200" not in [status for at, status in readiness if at >= first_503], readiness
    assert first_503 - sigterm_at < DELAY_S / 2, "readiness was slow to turn 503"

    # New connections refused once the delay is over, while uploads were still in flight.
    assert alive_while_draining, "the process exited before its in-flight uploads finished"
    # With workers, uvicorn's supervisor keeps the listening socket (to start replacements)
    # until every worker has stopped: a late connection is queued, never served, then reset.
    assert new_connection in ("refused", "ReadError", "RemoteProtocolError"), new_connection
    if one_process:  # the listener itself is gone
        assert new_connection == "refused", new_connection

    # No request failed: every one that was sent completed with 200, including those in
    # flight at SIGTERM, those started during the delay, and the slow uploads that spanned
    # the listener's close.
    failed = [o for o in outcomes if o.result != "200"]
    assert not failed, f"{len(failed)} failed of {len(outcomes)}: {failed[:10]}"
    in_flight_at_sigterm = [o for o in outcomes if o.started < sigterm_at < o.ended]
    during_delay = [o for o in outcomes if sigterm_at < o.started]
    slow = [o for o in outcomes if o.ended - o.started >= SLOW_UPLOAD_S * 0.9]
    assert in_flight_at_sigterm, "no request was in flight at SIGTERM"
    assert during_delay, "no request was served during the delay"
    assert len(slow) >= SLOW_UPLOADS
    assert max(o.ended for o in slow) > sigterm_at + DELAY_S, "uploads did not span the stop"
