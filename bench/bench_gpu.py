"""The CUDA execution provider on a real GPU: served answers against the CPU provider's,
raw onnxruntime throughput, and served throughput. Adds what it measured to a JSON file.

Needs onnxruntime-gpu with its CUDA 13 and cuDNN 9 libraries on ``LD_LIBRARY_PATH`` (the
``nvidia-*`` pip packages' ``lib`` folders will do), a GPU, torch (bench/make_models.py
exports the benchmark's ResNet-20) and, for ``serve``, wrk on the PATH.

    python bench/bench_gpu.py check --out gpu.json
    python bench/bench_gpu.py raw --out gpu.json
    python bench/bench_gpu.py serve --out gpu.json

- ``check``: one ``python -m service`` with ``RELU_SERVE_PROVIDERS=cuda,cpu`` and
  ``RELU_SERVE_STRICT_PROVIDERS=true``, one with ``cpu``, both on 127.0.0.1 serving the default
  model and ResNet-20: the metadata's providers, the same requests (batches of 1 to 64, with
  ``stats=channels``, and without statistics) on both and the largest differences, the
  provider lines of ``/metrics``; and in-process, CUDA with and without TF32 against the CPU.
- ``raw``: ResNet-20 in a plain onnxruntime session (the service's session options), images/s
  at batch 1, 32 and 64 on CUDA (numpy in and out, as the service runs it, and with inputs and
  outputs bound on the GPU) and on the CPU provider; the first run at each batch size apart.
- ``serve``: wrk (1 thread, N connections, the Lua script of bench/serving/load.py) against
  both servers.

Figures are medians over ``--repeat`` windows or runs; every window is kept in the JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.make_models import build_repository  # noqa: E402
from bench.serving.inputs import our_requests, sample_input  # noqa: E402
from bench.serving.load import run_wrk  # noqa: E402
from bench.serving.servers import PY, Server, free_port, start_server, stop_server  # noqa: E402
from service.runtime.providers import session_options  # noqa: E402

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
MODELS = ("digits", "resnet20")
SERVER_OPTIONS = ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]


def nvidia_smi(query: str) -> str:
    """One nvidia-smi query as CSV lines, or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
    except FileNotFoundError:
        return "nvidia-smi not found"
    return (out.stdout or out.stderr).strip()


def device_info() -> dict[str, Any]:
    """GPU, driver and onnxruntime build."""
    return {
        "gpu": nvidia_smi("--query-gpu=name,driver_version,memory.total"),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "python": sys.version.split()[0],
    }


def server(name: str, repo: Path, providers: str) -> Server:
    """``python -m service`` on ``providers``, strict, quiet."""
    env = {
        "RELU_SERVE_MODEL_ROOT": str(repo),
        "RELU_SERVE_PROVIDERS": providers,
        "RELU_SERVE_STRICT_PROVIDERS": "true",
        "RELU_SERVE_LOG_LEVEL": "warning",
        "RELU_SERVE_MAX_QUEUE_LENGTH": "256",
    }
    argv = [PY, "-m", "service", *SERVER_OPTIONS, "--no-access-log"]
    return Server(name, argv, env, "/health/ready", startup_s=180)


def http(port: int, path: str, body: dict | None = None) -> Any:
    """GET (or POST JSON) and decode the answer: JSON, or text for /metrics."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    return text if path == "/metrics" else json.loads(text)


def differences(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute differences between two predict answers: per label probability,
    and per statistic over every layer (channel_activity over every channel)."""
    out: dict[str, float] = {"probability": 0.0}
    for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
        qa = {t["index"]: t["probability"] for t in pa["top_k"]}
        qb = {t["index"]: t["probability"] for t in pb["top_k"]}
        out["probability"] = max(out["probability"], *(abs(qa[i] - qb[i]) for i in qa))
        out["top1_differs"] = out.get("top1_differs", 0) + (
            pa["top_k"][0]["index"] != pb["top_k"][0]["index"]
        )
    for la, lb in zip(
        a.get("stats", {}).get("layers", []), b.get("stats", {}).get("layers", []), strict=True
    ):
        for key, va in la.items():
            vb = lb[key]
            if key == "channel_activity":
                diff = float(np.max(np.abs(np.subtract(va, vb))))
            elif key == "dead_channels":
                diff = float(va != vb)
            elif isinstance(va, int | float) and not isinstance(va, bool):
                diff = abs(va - vb)
            else:
                continue
            out[key] = max(out.get(key, 0.0), diff)
    return out


def tf32_check(path: Path, x: np.ndarray) -> dict[str, Any]:
    """Largest probability and logit differences from the CPU provider, in-process: CUDA as
    the service creates it (provider defaults) and CUDA with ``use_tf32=0``."""

    def run(providers: list) -> np.ndarray:
        session = ort.InferenceSession(str(path), session_options(), providers=providers)
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    cpu = run([CPU])
    out = {}
    for label, providers in {
        "cuda_default": [CUDA, CPU],
        "cuda_tf32_off": [(CUDA, {"use_tf32": "0"}), CPU],
    }.items():
        logits = run(providers)
        out[label] = {
            "max_abs_logit": float(np.max(np.abs(logits - cpu))),
            "max_abs_probability": float(np.max(np.abs(softmax(logits) - softmax(cpu)))),
        }
    return out


def check(repo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two servers, the same requests, the largest differences; metadata and /metrics."""
    result: dict[str, Any] = {"providers": args.providers, "models": {}}
    procs, ports = {}, {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for name, providers in (("device", args.providers), ("cpu", "cpu")):
            ports[name] = free_port()
            started = time.perf_counter()
            procs[name] = start_server(
                server(name, repo, providers), ports[name], log_dir / f"{name}.log"
            )
            result[f"{name}_start_to_ready_s"] = time.perf_counter() - started
        for model in MODELS:
            meta = http(ports["device"], f"/v1/models/{model}")
            name, x1 = sample_input(repo / model / "1" / "model.onnx")
            rng = np.random.default_rng(0)
            rows = []
            for batch in args.check_batches:
                for stats in ("channels", "none"):
                    x = rng.standard_normal((batch, *x1.shape[1:])).astype(np.float32)
                    tensor = {
                        "shape": list(x.shape),
                        "data": base64.b64encode(x.tobytes()).decode(),
                    }
                    body = {"tensor": tensor, "stats": stats, "top_k": len(meta["labels"])}
                    answers = {
                        k: http(p, f"/v1/models/{model}/predict", body) for k, p in ports.items()
                    }
                    rows.append(
                        {
                            "batch": batch,
                            "stats": stats,
                            "provider": answers["device"]["provider"],
                            "fell_back": answers["device"]["fell_back"],
                            "max_abs_diff": differences(answers["device"], answers["cpu"]),
                        }
                    )
            worst = max(r["max_abs_diff"]["probability"] for r in rows)
            result["models"][model] = {
                "metadata": {k: meta[k] for k in ("providers", "fell_back", "fallback_reason")},
                "requests": rows,
                "max_abs_probability_diff": worst,
                "within_1e-4": worst <= 1e-4,
            }
            print(f"{model}: {meta['providers']}, largest probability difference {worst:.2e}")
        metrics = http(ports["device"], "/metrics")
        result["metrics_provider_lines"] = [
            line for line in metrics.splitlines() if "provider" in line and not line.startswith("#")
        ]
        result["gpu_memory_per_process"] = nvidia_smi("--query-compute-apps=pid,used_memory")
    finally:
        for proc in procs.values():
            stop_server(proc)
    if CUDA in ort.get_available_providers():
        path = repo / "resnet20" / "1" / "model.onnx"
        x = np.random.default_rng(1).standard_normal((64, 3, 32, 32)).astype(np.float32)
        result["resnet20_tf32_in_process"] = tf32_check(path, x)
    return result


def images_per_s(run, batch: int, seconds: float, repeat: int) -> list[float]:
    """``repeat`` windows of ``seconds``: images per second in each."""
    rates = []
    for _ in range(repeat):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            run()
            count += 1
        rates.append(count * batch / elapsed)
    return rates


def raw(repo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-20 images/s on CUDA (numpy in and out; bound on the GPU) and on the CPU."""
    path = repo / "resnet20" / "1" / "model.onnx"
    x64 = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    result: dict[str, Any] = {"threads": session_options().intra_op_num_threads}
    for label, providers in (("cuda", [CUDA, CPU]), ("cpu", [CPU])):
        if providers[0] not in ort.get_available_providers():
            continue
        session = ort.InferenceSession(str(path), session_options(), providers=providers)
        name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
        rows: dict[str, Any] = {"providers": session.get_providers()}
        for batch in args.batches:
            x = np.ascontiguousarray(x64[:batch])
            start = time.perf_counter()
            session.run([out], {name: x})
            first_ms = (time.perf_counter() - start) * 1e3
            for _ in range(10):
                session.run([out], {name: x})
            rates = images_per_s(
                partial(session.run, [out], {name: x}), batch, args.seconds, args.repeat
            )
            row = {
                "first_run_ms": first_ms,
                "images_per_s": rates,
                "median": statistics.median(rates),
            }
            if label == "cuda":
                binding = session.io_binding()
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
                binding.bind_output(out, "cuda", 0)
                session.run_with_iobinding(binding)
                bound = images_per_s(
                    partial(session.run_with_iobinding, binding), batch, args.seconds, args.repeat
                )
                row["gpu_bound"] = {"images_per_s": bound, "median": statistics.median(bound)}
            rows[str(batch)] = row
            print(
                f"raw {label:4s} batch {batch:3d}: {row['median']:10.0f} img/s "
                f"(first run {first_ms:.1f} ms)"
            )
        result[label] = rows
    return result


def serve(repo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """wrk against the device server and the CPU server: req/s, latency, server CPU."""
    result: dict[str, Any] = {"tool": "wrk -t1 -cN (bench/run.py's Lua script)", "cells": []}
    inputs = {m: sample_input(repo / m / "1" / "model.onnx") for m in MODELS}
    cells = [("resnet20", "binary", c) for c in args.clients]
    cells += [
        ("resnet20", "binary+stats", max(args.clients)),
        ("digits", "binary", max(args.clients)),
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-wrk-"))
    for name, providers in (("device", args.providers), ("cpu", "cpu")):
        port = free_port()
        proc = start_server(server(name, repo, providers), port, work / f"{name}.log")
        try:
            for model, kind, clients in cells:
                request = our_requests(model, *inputs[model])[kind]
                warm = run_wrk(port, request, clients, args.seconds, work, proc.pid)
                runs = [
                    run_wrk(port, request, clients, args.seconds, work, proc.pid)
                    for _ in range(args.repeat)
                ]
                cell = {
                    "server": name,
                    "providers": providers,
                    "model": model,
                    "request": kind,
                    "clients": clients,
                    "warm_up": warm,
                    "runs": runs,
                }
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request"):
                    values = [r[key] for r in runs if r.get(key) is not None]
                    cell[key] = statistics.median(values) if values else None
                cell["errors"] = sum(r.get("errors", 0) for r in runs)
                result["cells"].append(cell)
                print(
                    f"serve {name:6s} {model:8s} {kind:12s} c={clients:3d}: "
                    f"{cell['rps'] or 0:8.0f} req/s  p50 {cell['p50_ms'] or 0:.2f} ms  "
                    f"p99 {cell['p99_ms'] or 0:.2f} ms  errors {cell['errors']}"
                )
        finally:
            stop_server(proc)
    return result


def main() -> None:
    """Run the chosen sections and merge them into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="+", choices=["check", "raw", "serve"])
    parser.add_argument("--out", type=Path, help="JSON file to add the sections to")
    parser.add_argument(
        "--repo",
        type=Path,
        default=ROOT / "bench" / ".models",
        help="model repository (built if missing)",
    )
    parser.add_argument(
        "--providers", default="cuda,cpu", help="the device server's RELU_SERVE_PROVIDERS"
    )
    parser.add_argument(
        "--check-batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 3, 16, 64]
    )
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32, 64]
    )
    parser.add_argument(
        "--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 64]
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of one window or wrk run"
    )
    parser.add_argument("--repeat", type=int, default=5, help="windows (raw) or wrk runs (serve)")
    args = parser.parse_args()
    repo = build_repository(args.repo)
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    results["device"] = device_info()
    for section in args.sections:
        results[section] = {"check": check, "raw": raw, "serve": serve}[section](repo, args)
        results[section]["command"] = " ".join(["python", *sys.argv])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
