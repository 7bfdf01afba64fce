"""A real uvicorn server on 127.0.0.1 for the tests that need a socket: one helper for all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def uvicorn_server(
    model_root: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    stop_timeout: float = 20,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``(url, process)`` of ``python -m service`` (uvicorn) serving ``model_root`` on a free
    127.0.0.1 port, once ``/health/ready`` answers 200. ``env`` adds RELU_SERVE_* settings
    (one worker of one intra-op thread and warning logs unless given). On exit a process
    still running gets SIGTERM, and is killed if it has not stopped within
    ``stop_timeout``."""
    port = free_port()
    environment = {
        **os.environ,
        "RELU_SERVE_WORKERS": "1",
        "RELU_SERVE_INTRA_OP_THREADS": "1",
        "RELU_SERVE_LOG_LEVEL": "warning",
        **(env or {}),
        "RELU_SERVE_MODEL_ROOT": str(model_root),
    }
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", *args]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"server exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready within 60 s")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
