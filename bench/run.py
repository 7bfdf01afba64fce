"""Serving benchmark: our service against raw onnxruntime, the HTTP ceiling, a naive server,
LitServe and BentoML, side by side in one run; prints a table and writes JSON.

    python bench/run.py --out bench/results/run.json          # full (~30 min)
    python bench/run.py --quick --out /tmp/quick.json         # smoke run (~1 min)

Rows, for the default model (digits, 1x8x8) and a ResNet-20 (3x32x32, random weights, built
by bench/make_models.py), each at 1, 8 and 64 concurrent clients:

1. ``raw``: onnxruntime in-process, batch 1 and batched (the limit: best of batch 32/64,
   one session of 2 threads spinning on or off, or two 1-thread runs side by side), images/s;
2. ``noop``: FastAPI + uvicorn, one route that reads the body and answers a fixed JSON (the
   HTTP ceiling), same uvicorn options, HTTP protocol (``service.server.protocol``) and worker count as
   ours (``python -m service``); ``noop-stock``, the same on uvicorn's own protocol, for
   reference;
3. ``naive``: FastAPI + onnxruntime, pydantic model with JSON lists, one ``session.run`` per
   request (bench/apps/naive.py), the baseline;
4. ``litserve`` and ``bentoml`` serving the same ONNX file with their batching, from the
   separate venv ``.venv-bench`` (bench/setup_third_party.sh); a row says why it is missing;
5. ``ours``: JSON with a base64 tensor, raw ``application/octet-stream``, v2 binary tensor
   extension, multipart PNG upload; statistics off, and on (``stats=summary``) for JSON and
   binary;
6. ``ours-mp``, an experiment: ``--processes`` copies of ours on one port, each with its own
   ``SO_REUSEPORT`` socket and a share of the onnxruntime threads (bench/apps/reuseport.py),
   binary requests, statistics off and on. The service itself runs one process;
7. ``proto`` and ``proto-asgi``: issue 4's throwaway prototype (greedy batching, one inference
   thread, raw float32 bodies, no validation or metrics; bench/apps/prototype.py), on its own
   asyncio HTTP and as a plain ASGI app on uvicorn: what the ``x raw`` figure asks of a
   batching server with nothing else to do.

Load: wrk (Debian's ``apt-get install wrk``; ~20-40 us CPU per request) with one thread and
N connections (= clients), a Lua script per body, ``--duration`` seconds per cell, each cell
``--repeat`` times: the table shows medians, the JSON every repeat. CPU per request is the
server's process tree CPU time (``/proc/<pid>/stat``) over the requests it answered; the JSON
also has wrk's own (``client_cpu_us_per_request``, ~8-13 us here). Nothing is pinned to
cores: the server and wrk share the 2 cores as they would on a small host. Every server binds
127.0.0.1.

After the table, per model, a bound for the ``x raw`` figure (``http_bounds``): a server whose
HTTP cost only what the no-op's does (its CPU and wrk's, per request) and whose inference
cost only what raw batched onnxruntime's does, with no core ever idle, could serve the cores'
CPU time divided by the sum of the two per request. Then the figures' three ratios once
more, paired (``--paired-rounds``, ``run_paired``): both sides measured back to back, round
after round, so that drifts in the host's speed cancel out; and the same ratios for
``ours-mp`` and the prototypes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.make_models import build_repository  # noqa: E402
from service.__main__ import HTTP_PROTOCOL  # noqa: E402

PY = sys.executable
BENCH_VENV = ROOT / ".venv-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODELS = ("digits", "resnet20")

LUA = """
wrk.method = "POST"
{headers}
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  io.write(string.format(
    'BENCH {{"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, '
    .. '"status_errors": %d, "socket_errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
"""


@dataclass
class Request:
    """One kind of request: path, headers and body."""

    path: str
    headers: dict[str, str]
    body: bytes


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


# --------------------------------------------------------------------------- inputs


def sample_input(model_path: Path) -> tuple[str, np.ndarray]:
    """The model's input name and one seeded input (1, C, H, W) in the model's range."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [1, *[int(d) for d in meta.shape[1:]]]
    rng = np.random.default_rng(0)
    return meta.name, rng.standard_normal(shape).astype(np.float32)


def png_bytes(x: np.ndarray) -> bytes:
    """A PNG of the model's input size: grayscale or RGB."""
    from PIL import Image

    _, c, h, w = x.shape
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (h, w, 3) if c == 3 else (h, w), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB" if c == 3 else "L").save(buffer, format="PNG")
    return buffer.getvalue()


def our_requests(model: str, input_name: str, x: np.ndarray) -> dict[str, Request]:
    """The request kinds of our service for one model."""
    raw = x.tobytes()
    shape = ",".join(str(d) for d in x.shape)
    b64 = base64.b64encode(raw).decode()
    json_h = {"Content-Type": "application/json"}
    bin_h = {"Content-Type": "application/octet-stream", "X-Tensor-Shape": shape}
    tensor = {"shape": list(x.shape), "data": b64}
    v2_head = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    boundary = "benchboundary7MA4YWxkTrZu0gW"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes(x)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    predict = f"/v1/models/{model}/predict"
    return {
        "json-b64": Request(predict, json_h, json.dumps({"tensor": tensor}).encode()),
        "binary": Request(predict, bin_h, raw),
        "v2-binary": Request(
            f"/v2/models/{model}/infer",
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(v2_head)),
            },
            v2_head + raw,
        ),
        "image": Request(
            predict, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, multipart
        ),
        "json-b64+stats": Request(
            predict, json_h, json.dumps({"tensor": tensor, "stats": "summary"}).encode()
        ),
        "binary+stats": Request(predict + "?stats=summary", bin_h, raw),
    }


# --------------------------------------------------------------------------- raw onnxruntime


def raw_session(model_path: Path, threads: int, spinning: str) -> Any:
    """A plain onnxruntime CPU session: ``threads`` intra-op threads, spinning on ("1") or
    off ("0")."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def raw_rate(session: Any, batch: np.ndarray, seconds: float, runners: int = 1) -> float:
    """Images/s: the best of 0.25 s windows within ``seconds`` (the limit, robust to other
    work on a shared host); ``runners`` threads call ``run`` side by side."""
    feeds = {session.get_inputs()[0].name: batch}
    for _ in range(3):
        session.run(None, feeds)

    def window(counts: list[int], i: int, until: float) -> None:
        while time.perf_counter() < until:
            session.run(None, feeds)
            counts[i] += 1

    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        counts, start = [0] * runners, time.perf_counter()
        threads = [
            threading.Thread(target=window, args=(counts, i, start + 0.25)) for i in range(runners)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(best, sum(counts) * batch.shape[0] / (time.perf_counter() - start))
    return best


def measure_raw(model_path: Path, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """Images/s of onnxruntime alone: batch 1 and batched (best of 32/64; one session of two
    intra-op threads, spinning on or off, or two one-thread runs side by side)."""
    results: dict[str, Any] = {"batch1": {}, "batched": {}}
    for spinning in ("1", "0"):
        two_threads = raw_session(model_path, 2, spinning)
        results["batch1"][f"spin{spinning}"] = raw_rate(two_threads, x, seconds)
        for size in (32, 64):
            batch = np.repeat(x, size, 0)
            results["batched"][f"b{size}_spin{spinning}"] = raw_rate(two_threads, batch, seconds)
    one_thread = raw_session(model_path, 1, "1")
    for size in (32, 64):
        batch = np.repeat(x, size, 0)
        results["batched"][f"b{size}_2x1thread"] = raw_rate(one_thread, batch, seconds, 2)
    results["batch1_ips"] = max(results["batch1"].values())
    results["batched_ips"] = max(results["batched"].values())
    return results


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (threads included)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def start_server(server: Server, port: int, log: Path) -> subprocess.Popen:
    """Start and wait until its health URL answers 200 (or raise with the log's tail)."""
    argv = [a.replace("{port}", str(port)) for a in server.argv]
    env = {**os.environ, **server.env, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
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


def check_request(port: int, request: Request) -> str | None:
    """None when one request answers 200, else why not."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{request.path}", data=request.body, headers=request.headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return None if r.status == 200 else f"status {r.status}"
    except urllib.error.HTTPError as exc:
        return f"status {exc.code}: {exc.read()[:200]!r}"
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)


def run_wrk(
    port: int, request: Request, clients: int, seconds: float, workdir: Path, pid: int
) -> dict[str, Any]:
    """One wrk run; requests/s, latency percentiles, errors, server CPU per request."""
    body = workdir / "body.bin"
    body.write_bytes(request.body)
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in request.headers.items())
    script = workdir / "post.lua"
    script.write_text(LUA.format(headers=headers, body=body))
    argv = [
        "wrk",
        "-t1",
        f"-c{clients}",
        f"-d{max(seconds, 1):.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{request.path}",
    ]
    cpu0, client0 = tree_cpu_seconds(pid), _children_cpu_seconds()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    cpu1, client1 = tree_cpu_seconds(pid), _children_cpu_seconds()
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        return {"error": f"wrk failed: {out.stdout[-300:]} {out.stderr[-300:]}"}
    data = json.loads(line[6:])
    n = data["requests"]
    errors = data["status_errors"] + data["socket_errors"]
    return {
        "rps": (n - data["status_errors"]) / (data["duration_us"] / 1e6),
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "errors": errors,
        "requests": n,
        "cpu_us_per_request": (cpu1 - cpu0) * 1e6 / n if n else None,
        "client_cpu_us_per_request": (client1 - client0) * 1e6 / n if n else None,
    }


def _children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (each wrk run, once waited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- the matrix


def octet_stream(path: str, body: bytes) -> Request:
    """A POST of raw bytes (``application/octet-stream``), for the servers that take them
    without a shape header."""
    return Request(path, {"Content-Type": "application/octet-stream"}, body)


def reuseport_argv(processes: int, command: list[str]) -> list[str]:
    """``command`` run as ``processes`` copies on one port (``{port}``), each with its own
    SO_REUSEPORT socket passed as ``--fd`` (bench/apps/reuseport.py)."""
    launcher = [PY, "bench/apps/reuseport.py", "--processes", str(processes)]
    return [*launcher, "--host", "127.0.0.1", "--port", "{port}", "--", *command]


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
        "--workers",
        str(args.workers),
        "--no-access-log",
    ]
    inputs = {m: sample_input(repo / m / "1" / "model.onnx") for m in models}
    servers: list[Server] = []
    uvicorn = [PY, "-m", "uvicorn", *options]
    # The ceiling runs on the same stack as ours: uvicorn with our HTTP protocol.
    noop = Server("noop", [*uvicorn, "--http", HTTP_PROTOCOL, "bench.apps.noop:app"], {}, "/health")
    # For reference: the same no-op on uvicorn's own protocol (two writes per response).
    stock = Server("noop-stock", [*uvicorn, "bench.apps.noop:app"], {}, "/health")
    for server in (noop, stock):
        for m in models:
            server.requests[f"{m}:binary"] = octet_stream("/noop", inputs[m][1].tobytes())
        servers.append(server)
    ours_env = {
        "RELU_SERVE_MODEL_ROOT": str(repo),
        "RELU_SERVE_LOG_LEVEL": "warning",
        "RELU_SERVE_INTRA_OP_THREADS": str(args.threads),
        "RELU_SERVE_MAX_QUEUE_LENGTH": "256",
    }
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
    if args.processes > 1:  # an experiment: the service runs one process (see reuseport.py)
        command = [PY, "-m", "service", "--log-level", "warning", "--no-access-log"]
        threads = str(max(1, args.threads // args.processes))
        multi = Server(
            MULTI,
            reuseport_argv(args.processes, command),
            {**ours_env, "RELU_SERVE_INTRA_OP_THREADS": threads},
            "/health/ready",
        )
        for key, request in ours.requests.items():
            if key.endswith((":binary", ":binary+stats")):
                multi.requests[key] = request
        servers.append(multi)
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
        asgi = [*uvicorn, "--http", HTTP_PROTOCOL, "bench.apps.prototype:app"]
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


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    """Raw onnxruntime first (quiet machine), then each server for every request and client
    count."""
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found; install it with `apt-get install -y wrk`")
    repo = build_repository(args.models_dir)
    models = ["digits"] if args.quick else list(MODELS)
    servers, inputs = build_servers(repo, models, args)
    clients = [int(c) for c in args.clients.split(",")]
    result: dict[str, Any] = {
        "settings": {
            "duration_s": args.duration,
            "repeat": args.repeat,
            "clients": clients,
            "uvicorn_workers": args.workers,
            "ours_intra_op_threads": args.threads,
            "multi_processes": args.processes,
            "ours_env": args.ours_env,
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "raw": {},
        "cells": [],
        "unavailable": {},
    }
    raw_seconds = 0.5 if args.quick else 2.0
    for m in models:
        result["raw"][m] = measure_raw(repo / m / "1" / "model.onnx", inputs[m][1], raw_seconds)
        print(
            f"raw onnxruntime {m}: batch 1 {result['raw'][m]['batch1_ips']:.0f} img/s, "
            f"batched {result['raw'][m]['batched_ips']:.0f} img/s",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        for server in servers:
            if args.only and server.name not in args.only.split(","):
                continue
            if server.unavailable:
                result["unavailable"][server.name] = server.unavailable
                continue
            port = free_port()
            try:
                proc = start_server(server, port, workdir / f"{server.name}.log")
            except RuntimeError as exc:
                result["unavailable"][f"{server.name}:{','.join(server.requests)}"] = str(exc)
                print(f"{server.name}: {exc}", flush=True)
                continue
            try:
                for key, request in server.requests.items():
                    model, kind = key.split(":")
                    problem = check_request(port, request)
                    if problem is None:  # warm-up
                        run_wrk(port, request, 8, 1, workdir, proc.pid)
                    for c in clients:
                        cell: dict[str, Any] = {
                            "server": server.name,
                            "model": model,
                            "request": kind,
                            "clients": c,
                            "runs": [],
                        }
                        if problem is not None:
                            cell["error"] = problem
                        else:
                            for _ in range(args.repeat):
                                cell["runs"].append(
                                    run_wrk(port, request, c, args.duration, workdir, proc.pid)
                                )
                        summarize_cell(cell)
                        result["cells"].append(cell)
                        print(format_row(cell, result), flush=True)
            finally:
                stop_server(proc)
        if args.paired_rounds:
            result["paired"] = run_paired(args, repo, servers, inputs, max(clients), workdir)
    result["settings"]["loadavg_end"] = os.getloadavg()
    add_ratios(result)
    result["figures"] = check_figures(result)
    result["bounds"] = http_bounds(result)
    return result


# The figures' ratios measured once more in alternation: (name, numerator, denominator), each
# side a (server, "model:request") or "raw" (onnxruntime alone, batch 32, 2 threads).
PAIRS = (
    ("digits: ours / noop", ("ours", "digits:binary"), ("noop", "digits:binary")),
    ("resnet20: stats on / off", ("ours", "resnet20:binary+stats"), ("ours", "resnet20:binary")),
    ("resnet20: ours / raw batched", ("ours", "resnet20:binary"), "raw"),
)
# Not figures of the service: the same ratios for ``--processes`` copies of it on one port
# (``MULTI``; the service runs one process), and for issue 4's prototype, bare and on uvicorn
# (bench/apps/prototype.py), the references for what the figures ask.
MULTI = "ours-mp"
EXPERIMENT_PAIRS = (
    ("digits: ours-mp / noop", (MULTI, "digits:binary"), ("noop", "digits:binary")),
    (
        "resnet20: ours-mp stats on / off",
        (MULTI, "resnet20:binary+stats"),
        (MULTI, "resnet20:binary"),
    ),
    ("resnet20: ours-mp / raw batched", (MULTI, "resnet20:binary"), "raw"),
    ("resnet20: proto / raw batched", ("proto", "resnet20:binary"), "raw"),
    ("resnet20: proto-asgi / raw batched", ("proto-asgi", "resnet20:binary"), "raw"),
    ("digits: proto-asgi / noop", ("proto-asgi", "digits:binary"), ("noop", "digits:binary")),
)


def run_paired(
    args: argparse.Namespace,
    repo: Path,
    servers: list[Server],
    inputs: dict,
    clients: int,
    workdir: Path,
) -> dict[str, Any]:
    """Each pair's ratio as the median over ``--paired-rounds`` rounds of one measurement of
    each side, back to back, the order swapped every round: drifts in the host's speed,
    which the matrix (one server after the other, minutes apart) turns into errors in its
    ratios, hit both sides of a round alike."""
    only = args.only.split(",") if args.only else None
    usable = [s for s in servers if not s.unavailable and (only is None or s.name in only)]

    def server_of(side: Any) -> Server | None:
        """The server that answers ``side``'s request (naive and the prototypes run one
        server per model under one name)."""
        return next((s for s in usable if s.name == side[0] and side[1] in s.requests), None)

    wanted = [
        pair
        for pair in PAIRS + EXPERIMENT_PAIRS
        if all(side == "raw" or server_of(side) for side in pair[1:])
    ]
    needed = {
        id(server): server
        for _, *sides in wanted
        for side in sides
        if side != "raw" and (server := server_of(side))
    }
    procs, ports = {}, {}
    raw = {}
    if any("raw" in sides for _, *sides in wanted):
        path, x = repo / "resnet20" / "1" / "model.onnx", inputs["resnet20"][1]
        raw = {"session": raw_session(path, 2, "1"), "batch": np.repeat(x, 32, 0)}

    def measure(side: Any, n_clients: int, seconds: float) -> float:
        if side == "raw":
            return raw_rate(raw["session"], raw["batch"], seconds)
        server = server_of(side)
        port, pid = ports[id(server)], procs[id(server)].pid
        return run_wrk(port, server.requests[side[1]], n_clients, seconds, workdir, pid)["rps"]

    out: dict[str, Any] = {"rounds": args.paired_rounds, "clients": clients, "pairs": {}}
    try:
        for key, server in needed.items():
            ports[key] = free_port()
            procs[key] = start_server(server, ports[key], workdir / f"paired-{key}.log")
        for label, top, bottom in wanted:
            measure(top, 8, 1)  # warm-up
            measure(bottom, 8, 1)
            tops, bottoms = [], []
            for i in range(args.paired_rounds):
                for side in (top, bottom) if i % 2 == 0 else (bottom, top):
                    (tops if side is top else bottoms).append(measure(side, clients, args.duration))
            ratios = [a / b for a, b in zip(tops, bottoms, strict=True)]
            out["pairs"][label] = {
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "numerator": tops,
                "denominator": bottoms,
            }
            rounds = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"paired {label}: {statistics.median(ratios):.2f} ({rounds})", flush=True)
    finally:
        for proc in procs.values():
            stop_server(proc)
    return out


def summarize_cell(cell: dict[str, Any]) -> None:
    """Medians over the repeats, and the spread of requests/s."""
    runs = [r for r in cell["runs"] if "error" not in r]
    if not runs:
        if cell["runs"]:
            cell["error"] = cell["runs"][0]["error"]
        return
    for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "client_cpu_us_per_request"):
        values = [r[key] for r in runs if r[key] is not None]
        cell[key] = statistics.median(values) if values else None
    cell["errors"] = sum(r["errors"] for r in runs)
    rps = [r["rps"] for r in runs]
    cell["rps_spread"] = (max(rps) - min(rps)) / statistics.median(rps) if len(rps) > 1 else 0.0


def _find(result: dict, server: str, model: str, clients: int, request: str | None = None):
    for cell in result["cells"]:
        if (
            cell["server"] == server
            and cell["model"] == model
            and cell["clients"] == clients
            and (request is None or cell["request"] == request)
            and "rps" in cell
        ):
            return cell
    return None


def add_ratios(result: dict[str, Any]) -> None:
    """Each cell's throughput as a share of raw batched onnxruntime, noop and naive."""
    for cell in result["cells"]:
        if "rps" not in cell:
            continue
        raw = result["raw"].get(cell["model"], {})
        cell["x_raw"] = cell["rps"] / raw["batched_ips"] if raw else None
        noop = _find(result, "noop", cell["model"], cell["clients"])
        cell["x_noop"] = cell["rps"] / noop["rps"] if noop else None
        naive = _find(result, "naive", cell["model"], cell["clients"])
        cell["x_naive"] = cell["rps"] / naive["rps"] if naive else None


def http_bounds(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What a server could reach at the most clients if its HTTP cost only what the no-op's
    does (server and wrk CPU per request, measured) and its inference only what raw batched
    onnxruntime's does (all cores busy), with nothing idle: the cores' CPU time divided by
    the sum of those costs per request. A reference for the ``x raw`` figure, not a target:
    every request pays the HTTP, so no server on this stack reaches ``raw``."""
    bounds = {}
    cpus, clients = result["settings"]["cpus"], max(result["settings"]["clients"])
    for model, raw in result["raw"].items():
        noop = _find(result, "noop", model, clients)
        if not noop or not raw or noop.get("client_cpu_us_per_request") is None:
            continue
        http_us = noop["cpu_us_per_request"] + noop["client_cpu_us_per_request"]
        compute_us = cpus * 1e6 / raw["batched_ips"]
        rps = cpus * 1e6 / (http_us + compute_us)
        ours = _find(result, "ours", model, clients, "binary")
        multi = _find(result, MULTI, model, clients, "binary")
        bounds[model] = {
            "http_us_per_request": http_us,
            "compute_us_per_image": compute_us,
            "bound_rps": rps,
            "bound_x_raw": rps / raw["batched_ips"],
            "ours_x_bound": ours["rps"] / rps if ours else None,
            "ours_mp_x_bound": multi["rps"] / rps if multi else None,
            "clients": clients,
        }
    return bounds


def check_figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    figures: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher: bool = True) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        figures.append({"figure": name, "value": value, "target": target, "met": met})

    best = "binary"  # our leanest request form
    r64 = _find(result, "ours", "resnet20", 64, best)
    if r64:
        add("resnet20 64 clients: x raw batched", r64["x_raw"], 0.8)
        add("resnet20 64 clients: x naive", r64["x_naive"], 2.5)
        add("resnet20 64 clients: p99 / p50", r64["p99_ms"] / r64["p50_ms"], 3.0, higher=False)
        stats = _find(result, "ours", "resnet20", 64, f"{best}+stats")
        if stats:
            add("resnet20 64 clients: stats on / off", stats["rps"] / r64["rps"], 0.8)
    d64 = _find(result, "ours", "digits", 64, best)
    if d64:
        add("digits 64 clients: x noop", d64["x_noop"], 0.8)
        stock = _find(result, "noop-stock", "digits", 64)
        if stock:  # for reference: the ceiling with uvicorn's own protocol
            add("digits 64 clients: x noop on stock uvicorn", d64["rps"] / stock["rps"], 0.8)
        add("digits 64 clients: x naive", d64["x_naive"], 3.0)
    for label, *_ in PAIRS:  # each pair is one of the 0.8x figures
        pair = result.get("paired", {}).get("pairs", {}).get(label)
        if pair:
            add(f"paired, {label}", pair["ratio"], 0.8)
    for model in MODELS:
        ours1 = _find(result, "ours", model, 1, best)
        naive1 = _find(result, "naive", model, 1)
        if ours1 and naive1:
            add(f"{model} 1 client: p50 naive / ours", naive1["p50_ms"] / ours1["p50_ms"], 1.0)
        for other in ("litserve", "bentoml"):
            for c in result["settings"]["clients"]:
                them, us = _find(result, other, model, c), _find(result, "ours", model, c, best)
                if them and us:
                    add(f"{model} {c} clients: x {other}", us["rps"] / them["rps"], 1.0)
    return figures


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    f"{'server':9} {'model':9} {'request':15} {'cl':>3} {'req/s':>8} {'p50 ms':>8} "
    f"{'p99 ms':>8} {'err':>5} {'cpu us/r':>8} {'spread':>6}"
)


def format_row(cell: dict[str, Any], result: dict | None = None) -> str:
    """One table line."""
    head = f"{cell['server']:9} {cell['model']:9} {cell['request']:15} {cell['clients']:>3}"
    if "rps" not in cell:
        return f"{head} error: {cell.get('error', '?')}"[:200]
    line = (
        f"{head} {cell['rps']:>8.0f} {cell['p50_ms']:>8.2f} {cell['p99_ms']:>8.2f} "
        f"{cell['errors']:>5} {_fmt(cell['cpu_us_per_request'], '>8.0f')} "
        f"{cell.get('rps_spread', 0) * 100:>5.0f}%"
    )
    if "x_raw" in cell:
        line += (
            f" {_fmt(cell['x_raw'], '>6.2f')} {_fmt(cell['x_noop'], '>6.2f')} "
            f"{_fmt(cell['x_naive'], '>6.2f')}"
        )
    return line


def print_report(result: dict[str, Any]) -> None:
    """The whole table, raw onnxruntime and the figures."""
    print()
    for model, raw in result["raw"].items():
        print(
            f"raw onnxruntime {model}: batch 1 {raw['batch1_ips']:.0f} img/s, "
            f"batched {raw['batched_ips']:.0f} img/s  {raw['batched']}"
        )
    print(f"\n{HEADER} {'x raw':>6} {'x noop':>6} {'x naive':>6}")
    for cell in result["cells"]:
        print(format_row(cell))
    for name, why in result["unavailable"].items():
        print(f"{name}: not run: {why[:300]}")
    for model, b in result.get("bounds", {}).items():
        print(
            f"\n{model}, {b['clients']} clients: no-op HTTP {b['http_us_per_request']:.0f} us "
            f"of CPU per request (server + wrk) + raw compute "
            f"{b['compute_us_per_image']:.0f} us per image -> at most "
            f"{b['bound_rps']:.0f} req/s = {b['bound_x_raw']:.2f}x raw; "
            f"ours binary {_fmt(b['ours_x_bound'], '.2f')}x that"
        )
    print("\nfigures:")
    for f in result["figures"]:
        mark = {True: "met", False: "NOT met", None: "?"}[f["met"]]
        print(f"  {f['figure']:45} {_fmt(f['value'], '.2f'):>6} (target {f['target']}) {mark}")
    pairs = result.get("paired", {}).get("pairs", {})
    experiments = [label for label, *_ in EXPERIMENT_PAIRS if label in pairs]
    if experiments:
        processes = result["settings"].get("multi_processes")
        print(
            f"\nexperiments, not figures: {MULTI} = {processes} processes of ours on one port; "
            "proto = issue 4's prototype (bench/apps/prototype.py), proto-asgi = on uvicorn:"
        )
    for label in experiments:
        print(f"  paired, {label:43} {pairs[label]['ratio']:>6.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, few rows, 1 s")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (4)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per cell, median (3)")
    parser.add_argument("--clients", default=None, help="concurrent clients (1,8,64)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server")
    parser.add_argument("--threads", type=int, default=2, help="our onnxruntime threads")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help=f"also run this many copies of ours on one port, {MULTI} (2; 0 or 1: not)",
    )
    parser.add_argument(
        "--ours-env", action="append", default=[], help="extra KEY=VALUE for our server"
    )
    parser.add_argument("--no-third-party", action="store_true", help="skip LitServe/BentoML")
    parser.add_argument(
        "--paired-rounds", type=int, default=None, help="rounds of the paired ratios (6; 0: none)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated servers to run (noop,ours,naive,...)"
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "relu-serve-bench-models",
        help="model repository to build or reuse",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 4.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.clients = args.clients or ("1,8" if args.quick else "1,8,64")
    if args.paired_rounds is None:
        args.paired_rounds = 2 if args.quick else 6
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write the JSON."""
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    result = run_matrix(args)
    print_report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
