"""Load and what it costs: one wrk run (one thread, N connections, a Lua script that prints
its summary as JSON) against a server, with the server's process tree CPU time read from
/proc and wrk's own from this process's finished children; a single request to check a
server answers before it is loaded; and raw onnxruntime in-process, the limit the servers
are compared with."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.inputs import Request

CLK_TCK = os.sysconf("SC_CLK_TCK")

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
    """One wrk run; requests/s answered (status errors not counted), latency percentiles (of
    every response: wrk's histogram has no status), errors, server CPU per request."""
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
        "status_errors": data["status_errors"],  # answers other than 2xx/3xx: 503 when shed
        "socket_errors": data["socket_errors"],
        "requests": n,
        "cpu_us_per_request": (cpu1 - cpu0) * 1e6 / n if n else None,
        "client_cpu_us_per_request": (client1 - client0) * 1e6 / n if n else None,
    }


def _children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (each wrk run, once waited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
