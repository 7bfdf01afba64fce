"""Soak: a real server under steady concurrent load; zero errors, bounded memory.

    python bench/soak.py [--duration 300] [--clients 32] [--warmup 30] [--out FILE.json]

Starts ``python -m service`` (uvicorn, as ``scripts/serve`` does) on a free 127.0.0.1 port,
drives ``--clients`` concurrent keep-alive connections for ``--duration`` seconds with a mix
of requests (a v1 image, a v1 image with ``stats=summary``, a v2 tensor ``infer``), samples
the server's resident memory (``VmRSS``) every ``--interval`` seconds, then stops the server
with SIGTERM. The load generator is wrk with a Lua script where installed (~20-40 us of CPU
a request, SPEC.md; ``apt-get install wrk``), else a small asyncio client on raw sockets.

Pass: no failed request (socket errors, timeouts, non-2xx) and RSS growth after warm-up
(highest sample after warm-up over the sample at the end of warm-up) under ``--max-growth``
(10%). Prints a summary, writes JSON, exits 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
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
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _digit_png(seed: int) -> bytes:
    """A 28x28 light stroke on black, shifted by ``seed`` so bodies differ."""
    image = np.zeros((28, 28), dtype=np.uint8)
    x = 8 + seed % 10
    image[4:24, x : x + 4] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def build_requests(base: str, model: str) -> list[tuple[str, bytes]]:
    """(path, JSON body) pairs the clients cycle through."""
    with urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=10) as response:
        metadata = json.load(response)
    (tensor_input,) = metadata["inputs"]
    shape = [1 if dim == -1 else int(dim) for dim in tensor_input["shape"]]
    values = np.random.default_rng(0).random(int(np.prod(shape))).round(4).tolist()
    v2 = {"inputs": [{**tensor_input, "shape": shape, "data": values}]}
    requests = []
    for seed in range(3):
        image = base64.b64encode(_digit_png(seed)).decode()
        requests.append((f"/v1/models/{model}/predict", {"images": [image]}))
        requests.append((f"/v1/models/{model}/predict", {"images": [image], "stats": "summary"}))
        requests.append((f"/v2/models/{model}/infer", v2))
    return [(path, json.dumps(body).encode()) for path, body in requests]


# ----------------------------------------------------------------------------- wrk

WRK_SCRIPT = """
local paths = {%(paths)s}
local bodies = {%(bodies)s}
local n = 0
local headers = {["Content-Type"] = "application/json"}

request = function()
  n = n + 1
  local k = (n %% #paths) + 1
  return wrk.format("POST", paths[k], headers, bodies[k])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_s": %%.3f, "errors": {"connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d}, "latency_ms": {"p50": %%.3f, ' ..
    '"p90": %%.3f, "p99": %%.3f, "max": %%.3f, "mean": %%.3f}}\\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
"""


def run_wrk(base: str, requests: list[tuple[str, bytes]], clients: int, duration: float) -> dict:
    """wrk with a Lua script cycling through ``requests``; its summary as a dict."""
    paths = ", ".join(f'"{path}"' for path, _ in requests)
    bodies = ", ".join(f"[==[{body.decode()}]==]" for _, body in requests)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"paths": paths, "bodies": bodies})
    try:
        threads = max(1, min(2, clients))
        command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(duration))}s"]
        command += ["--timeout", "10s", "-s", script.name, base]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.unlink(script.name)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    summary = json.loads(line.removeprefix("WRKJSON "))
    summary["failed"] = sum(summary["errors"].values())
    return summary


# ------------------------------------------------------------------- asyncio client


async def _client(
    host: str, port: int, requests: list[tuple[str, bytes]], offset: int, deadline: float,
    latencies: list[float], errors: dict[str, int],
) -> None:  # fmt: skip
    """One keep-alive connection sending requests back to back until ``deadline``."""
    raw = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for path, body in requests
    ]
    reader = writer = None
    n = offset
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(raw[n % len(raw)])
            n += 1
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), 10)
            latencies.append(time.perf_counter() - started)
            if not 200 <= status < 400:
                errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            errors["connect" if writer is None else "read"] += 1
            print(f"client error: {exc!r}", file=sys.stderr)
            if writer is not None:
                writer.close()
            reader = writer = None
        except TimeoutError:
            errors["timeout"] += 1
    if writer is not None:
        writer.close()


def run_python(base: str, requests: list[tuple[str, bytes]], clients: int, duration: float) -> dict:
    """The asyncio fall-back load generator; the same summary as ``run_wrk``."""
    host, port = base.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}

    async def main() -> None:
        deadline = time.monotonic() + duration
        await asyncio.gather(
            *(
                _client(host, int(port), requests, i, deadline, latencies, errors)
                for i in range(clients)
            )
        )

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "requests": len(latencies) + errors["connect"] + errors["read"] + errors["timeout"],
        "duration_s": round(elapsed, 3),
        "errors": errors,
        "failed": sum(errors.values()),
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
            "mean": float(ms.mean()),
        },
    }


# ----------------------------------------------------------------------------- soak


def start_server(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--timeout-graceful-shutdown", "30", "--no-access-log"]
    server = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = server.stdout.read().decode() if server.stdout else ""
            raise RuntimeError(f"server exited with {server.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1):
                return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("server not ready within 120 s")


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run one soak and return its figures (see the module docstring)."""
    driver = args.driver
    if driver == "auto":
        driver = "wrk" if shutil.which("wrk") else "python"
    port = _free_port()
    env = {**os.environ, "RELU_SERVE_LOG_LEVEL": "warning"}
    if args.model_root:
        env["RELU_SERVE_MODEL_ROOT"] = str(args.model_root)
    server = start_server(port, env)
    base = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((round(time.monotonic() - started, 2), round(_rss_mib(server.pid), 1)))
            stop.wait(args.interval)

    try:
        requests = build_requests(base, args.model)
        sampler = threading.Thread(target=sample, daemon=True)
        rss_ready = _rss_mib(server.pid)
        sampler.start()
        run = run_wrk if driver == "wrk" else run_python
        load = run(base, requests, args.clients, args.duration)
        stop.set()
        sampler.join()
        samples.append((round(time.monotonic() - started, 2), round(_rss_mib(server.pid), 1)))
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = server.wait()

    warmup = min(args.warmup, args.duration / 2)
    after = [rss for t, rss in samples if t >= warmup]
    warm_rss = after[0]
    growth = (max(after) - warm_rss) / warm_rss * 100
    result = {
        "driver": driver,
        "clients": args.clients,
        "duration_s": args.duration,
        "warmup_s": warmup,
        "requests": load["requests"],
        "requests_per_s": round(load["requests"] / load["duration_s"], 1),
        "failed": load["failed"],
        "errors": load["errors"],
        "latency_ms": {k: round(v, 2) for k, v in load["latency_ms"].items()},
        "rss_mib": {
            "ready": round(rss_ready, 1),
            "after_warmup": warm_rss,
            "max_after_warmup": max(after),
            "end": after[-1],
            "median_after_warmup": statistics.median(after),
        },
        "rss_growth_after_warmup_pct": round(growth, 2),
        "max_growth_pct": args.max_growth,
        "server_exit_code": exit_code,
        "rss_samples": samples,
        "cpus": os.cpu_count(),
        "load_average_before": args.load_before,
    }
    result["passed"] = result["failed"] == 0 and growth < args.max_growth and exit_code == 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS counts")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--model", default="digits", help="model to query")
    parser.add_argument("--model-root", type=Path, default=None, help="RELU_SERVE_MODEL_ROOT")
    parser.add_argument("--driver", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent RSS growth")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    result = soak(args)
    rss = result["rss_mib"]
    print(
        f"{result['driver']}: {result['clients']} clients x {result['duration_s']:.0f} s: "
        f"{result['requests']} requests ({result['requests_per_s']}/s), "
        f"{result['failed']} failed {result['errors']}; latency p50 "
        f"{result['latency_ms']['p50']} ms p99 {result['latency_ms']['p99']} ms; RSS ready "
        f"{rss['ready']} MiB, after warm-up {rss['after_warmup']}, max {rss['max_after_warmup']}, "
        f"end {rss['end']}: growth {result['rss_growth_after_warmup_pct']}% "
        f"(limit {args.max_growth}%); exit {result['server_exit_code']}; "
        f"{'PASS' if result['passed'] else 'FAIL'}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
