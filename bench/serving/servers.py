"""The servers under test: how each is started (command line, environment, health URL), on
which free port of 127.0.0.1, and stopped with its whole process group; ``build_servers``
lists every row of the benchmark (the no-op ceiling, ours, naive, the prototypes, LitServe and
BentoML from their own venv) with the requests each answers; ``ours_settings`` tells the worker
processes and onnxruntime threads ours runs with."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.serving.inputs import Request, octet_stream, our_requests, sample_input

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BENCH_VENV = ROOT / ".venv-bench"
# What the service resolves from its environment, printed as JSON by ``ours_settings`` (None
# for a setting that an older tree, in an A/B run, does not have).
RESOLVED_SETTINGS = (
    "import json; from service.settings import load_settings; s = load_settings(); "
    "print(json.dumps({k: getattr(s, k, None) for k in ('workers', 'intra_op_threads')}))"
)


@dataclass
class Server:
    """A server under test: how to start it and what it answers."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health: str
    requests: dict[str, Request] = field(default_factory=dict)
    startup_s: float = 60.0
    unavailable: str | None = None
    tree: Path = ROOT  # the source tree it runs from (another checkout, for A/B runs)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(server: Server, port: int, log: Path) -> subprocess.Popen:
    """Start and wait until its health URL answers 200 (or raise with the log's tail)."""
    argv = [a.replace("{port}", str(port)) for a in server.argv]
    env = {**os.environ, **server.env, "PYTHONPATH": str(server.tree)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=server.tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + server.startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{server.health}", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop_server(proc)
    tail = log.read_text(errors="replace")[-600:]
    raise RuntimeError(f"{server.name} did not become ready: {tail.strip()}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM its process group, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def ours_settings(server: Server, proc: subprocess.Popen | None = None) -> dict[str, Any]:
    """The worker processes and onnxruntime threads (per session; models under the service's
    small-model bound use one) that ``python -m service`` resolves from ``server``'s
    environment and tree; with its running ``proc``, also the worker processes it really has
    (uvicorn's supervisor spawns them; one worker runs in the supervisor's own process)."""
    env = {**os.environ, **server.env, "PYTHONPATH": str(server.tree)}
    out = subprocess.run(
        [PY, "-c", RESOLVED_SETTINGS],
        cwd=server.tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    resolved: dict[str, Any] = json.loads(out.stdout)
    if proc is not None:
        resolved["worker_processes"] = max(1, len(spawned_children(proc.pid)))
    return resolved


def spawned_children(pid: int) -> list[int]:
    """The children of ``pid`` started by multiprocessing's spawn (uvicorn's workers), not its
    resource tracker."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def build_servers(
    repo: Path, models: list[str], args: argparse.Namespace
) -> tuple[list[Server], dict]:
    """Every server to run and each model's sample input."""
    options = [
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    inputs = {m: sample_input(repo / m / "1" / "model.onnx") for m in models}
    servers: list[Server] = []
    # The references run ``--workers`` uvicorn workers (1: the figures compare with
    # the single-process no-op ceiling and naive baseline); ours its own default, see below.
    uvicorn = [PY, "-m", "uvicorn", *options, "--workers", str(args.workers)]
    # The ceiling runs on the same stack as ours: uvicorn, the same options, one process.
    noop = Server("noop", [*uvicorn, "bench.apps.noop:app"], {}, "/health")
    for m in models:
        noop.requests[f"{m}:binary"] = octet_stream("/noop", inputs[m][1].tobytes())
    servers.append(noop)
    ours_env = {"RELU_SERVE_MODEL_ROOT": str(repo), "RELU_SERVE_LOG_LEVEL": "warning"}
    # Unset, the service's defaults: a worker per CPU, the CPUs divided among them. Through
    # the environment, not ``--workers``: the workers divide the threads by the setting.
    if args.ours_workers is not None:
        ours_env["RELU_SERVE_WORKERS"] = str(args.ours_workers)
    if args.threads is not None:
        ours_env["RELU_SERVE_INTRA_OP_THREADS"] = str(args.threads)
    for item in args.ours_env:
        key, _, value = item.partition("=")
        ours_env[key] = value
    ours = Server("ours", [PY, "-m", "service", *options], ours_env, "/health/ready")
    for m in models:
        for kind, request in our_requests(m, *inputs[m]).items():
            if args.quick and kind not in ("json-b64", "binary", "binary+stats"):
                continue
            ours.requests[f"{m}:{kind}"] = request
    servers.append(ours)
    for m in models:
        path = str(repo / m / "1" / "model.onnx")
        x = inputs[m][1]
        naive = Server(
            "naive", [*uvicorn, "bench.apps.naive:app"], {"BENCH_MODEL": path}, "/health"
        )
        naive.requests[f"{m}:json-lists"] = Request(
            "/predict",
            {"Content-Type": "application/json"},
            json.dumps({"data": x.tolist()}).encode(),
        )
        servers.append(naive)
        # Issue 4's prototype (references for x raw): bare asyncio, and the same on uvicorn.
        binary = octet_stream("/predict", x.tobytes())
        bare = [PY, "bench/apps/prototype.py", path, "--port", "{port}"]
        proto = Server("proto", bare, {}, "/health")
        proto.requests[f"{m}:binary"] = binary
        asgi = [*uvicorn, "bench.apps.prototype:app"]
        proto_asgi = Server("proto-asgi", asgi, {"BENCH_MODEL": path}, "/health")
        proto_asgi.requests[f"{m}:binary"] = binary
        servers += [proto, proto_asgi]
        if args.quick or args.no_third_party:
            continue
        bench_py = BENCH_VENV / "bin" / "python"
        missing = None
        if not bench_py.is_file():
            missing = f"{bench_py} missing: run bench/setup_third_party.sh"
        lit = Server(
            "litserve",
            [str(bench_py), "bench/apps/litserve_app.py", path, "{port}"],
            {},
            "/health",
            startup_s=90,
            unavailable=missing,
        )
        lit.requests[f"{m}:json-b64"] = Request(
            "/predict",
            {"Content-Type": "application/json"},
            json.dumps(
                {"data": base64.b64encode(x[0].tobytes()).decode(), "shape": list(x.shape[1:])}
            ).encode(),
        )
        servers.append(lit)
        bento = Server(
            "bentoml",
            [
                str(BENCH_VENV / "bin" / "bentoml"),
                "serve",
                "bench.apps.bentoml_service:Classifier",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ],
            {"BENCH_MODEL": path, "BENTOML_HOME": str(Path(tempfile.gettempdir()) / "bentoml")},
            "/readyz",
            startup_s=120,
            unavailable=missing,
        )
        bento.requests[f"{m}:json-lists"] = Request(
            "/predict", {"Content-Type": "application/json"}, json.dumps({"x": x.tolist()}).encode()
        )
        servers.append(bento)
    return servers, inputs
