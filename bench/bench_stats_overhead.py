"""What activation statistics cost: plain model vs statistics off vs statistics on.

Builds ResNet-20 (ReLU, 3x32x32) and the small 1x8x8 CNN from the training registry, exports
them to ONNX (``dynamo=False``: the default exporter needs onnxscript), loads each as the
service does (``LoadedModel``) and times, interleaved run by run so that load from other
processes hits every variant alike:

- ``plain``:        an independent onnxruntime session of the exported file;
- ``off``:          the service's plain session (what a request without statistics runs);
- ``on``:           the service's statistics session, fetching every statistic;
- ``off_run``, ``on_run``: the full ``LoadedModel.run`` (input checks, softmax, and for
                    ``on_run`` the numpy aggregation), at ``stats="none"`` / ``"summary"``.

Targets (issue): ``off`` <= 1.05x ``plain``; ``on`` <= 1.3x ``off`` for ResNet-20, batch 32.

    .venv/bin/python bench/bench_stats_overhead.py --out bench/results/stats_overhead.json
    python bench/bench_stats_overhead.py --providers cuda,cpu --models resnet20   # on a GPU

``--providers`` takes ``RELU_SERVE_PROVIDERS``' form (default ``cpu``); the service's sessions
and the independent ``plain`` one then run on those providers, strictly (no fall-back).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.runtime.loaded_model import LoadedModel
from service.runtime.providers import available_cpus, session_options
from training.architectures import create_model

MODELS = {
    "resnet20": {"activation": "relu", "in_channels": 3, "image_size": (32, 32)},
    "small_cnn": {"activation": "relu", "in_channels": 1, "image_size": (8, 8)},
}


def export(name: str, folder: Path) -> Path:
    """Export a registry model with randomised batch-norm statistics (so that activations
    are not trivially half zero) to ``folder/<name>.onnx`` with a dynamic batch axis."""
    torch.manual_seed(0)
    cfg = MODELS[name]
    model = create_model(name, **cfg).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    height, width = cfg["image_size"]
    path = folder / f"{name}.onnx"
    torch.onnx.export(
        model,
        torch.randn(1, cfg["in_channels"], height, width),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def export_wide(folder: Path) -> Path:
    """A synthetic classifier whose weights are mostly dense (a 4096x4096 hidden layer,
    64 MiB), where sharing weights between the two sessions could matter."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> object:
        return numpy_helper.from_array((0.02 * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "c.w", "c.b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["c.act"]),
        helper.make_node("GlobalAveragePool", ["c.act"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "h1.w", "h1.b"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["h1.act"]),
        helper.make_node("Gemm", ["h1.act", "h2.w", "h2.b"], ["h2"], transB=1),
        helper.make_node("Relu", ["h2"], ["h2.act"]),
        helper.make_node("Gemm", ["h2.act", "o.w", "o.b"], ["logits"], transB=1),
    ]
    inits = [init("c.w", 64, 3, 3, 3), init("c.b", 64), init("h1.w", 4096, 64), init("h1.b", 4096)]
    inits += [init("h2.w", 4096, 4096), init("h2.b", 4096), init("o.w", 10, 4096), init("o.b", 10)]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "wide.onnx"
    save(model, str(path))
    return path


def _rss_mib() -> float:
    """Resident memory after returning freed heap to the OS (malloc_trim), in MiB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def rss_child(path: str, share: str) -> None:
    """(Child process) RSS added by loading and warming up one model, printed as JSON."""
    before = _rss_mib()
    model = LoadedModel.load(path, "m", "1", share_weights=share == "1")
    model.warm_up()
    print(json.dumps({"rss_mib": _rss_mib() - before}))


def measure_memory(paths: dict[str, Path]) -> dict:
    """RSS of a loaded model (both sessions) with and without shared weights, each in a
    fresh process."""
    results = {}
    for name, path in paths.items():
        row = {}
        for share in ("0", "1"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(path), share],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row["shared" if share == "1" else "separate"] = json.loads(out.stdout)["rss_mib"]
        results[name] = row
        print(
            f"{name:10s} RSS separate {row['separate']:7.1f} MiB  shared {row['shared']:7.1f} MiB"
        )
    return results


def time_variants(model: LoadedModel, plain: ort.InferenceSession, x: np.ndarray, reps: int):
    """Interleaved timings (seconds) of every variant on the same input."""
    feeds = {model.input_name: x}
    fetch_on = [model.output_name, *model._stat_fetches]
    variants = {
        "plain": lambda: plain.run([model.output_name], feeds),
        "off": lambda: model.plain_session.run([model.output_name], feeds),
        "on": lambda: model.stats_session.run(fetch_on, feeds),
        "off_run": lambda: model.run(x, "none"),
        "on_run": lambda: model.run(x, "summary"),
    }
    for run in variants.values():  # warm-up: first runs allocate and tune
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            variants[key]()
            times[key].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of time[a] / time[b], both taken in the same shuffled round:
    this machine's speed drifts by 10-40% over seconds (other tenants), and pairing runs
    that were a few milliseconds apart cancels that drift."""
    return float(np.median(np.asarray(times[a]) / np.asarray(times[b])))


def summarize(times: dict[str, list[float]]) -> dict:
    """Median and 10th percentile in ms, and the ratios the targets are about."""
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    p10 = {k: float(np.percentile(v, 10)) * 1e3 for k, v in times.items()}
    return {
        "paired_off_vs_plain": paired_ratio(times, "off", "plain"),
        "paired_on_vs_off": paired_ratio(times, "on", "off"),
        "paired_on_run_vs_off_run": paired_ratio(times, "on_run", "off_run"),
        "median_ms": med,
        "p10_ms": p10,
        "ratio_off_vs_plain": med["off"] / med["plain"],
        "ratio_on_vs_off": med["on"] / med["off"],
        "ratio_off_run_vs_plain": med["off_run"] / med["plain"],
        "ratio_on_run_vs_off_run": med["on_run"] / med["off_run"],
        "p10_ratio_on_vs_off": p10["on"] / p10["off"],
        "runs": len(next(iter(times.values()))),
    }


def main() -> None:
    """Export, load, time, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=200, help="timed runs per variant")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--models", default=",".join(MODELS), help="registry models to time")
    parser.add_argument(
        "--providers", default="cpu", help="execution providers in order, e.g. cuda,cpu"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also measure RSS with and without shared weights"
    )
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    threads = args.threads or available_cpus()
    batches = [int(b) for b in args.batches.split(",")]
    results = {
        "machine": {
            "cpus_available": available_cpus(),
            "threads": threads,
            "onnxruntime": ort.__version__,
            "processor": platform.processor() or platform.machine(),
            "providers": args.providers,
        },
        "models": {},
    }
    header = (
        f"{'model':10s} {'batch':>5s} {'plain':>8s} {'off':>8s} {'on':>8s} "
        f"{'off/plain':>9s} {'on/off':>7s} {'off_run':>8s} {'on_run':>8s} {'run on/off':>10s} "
        f"{'load':>5s}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        exported = {}
        for name in args.models.split(","):
            path = export(name, Path(tmp))
            exported[name] = path
            model = LoadedModel.load(
                path, name, "1", threads=threads, providers=args.providers, strict=True
            )
            model.warm_up()
            plain = ort.InferenceSession(
                str(path), session_options(threads), providers=list(model.providers.used)
            )
            results["machine"]["providers_used"] = list(model.providers.used)
            shape = list(model.input_shape[1:])
            rng = np.random.default_rng(0)
            for batch in batches:
                x = rng.standard_normal([batch, *shape]).astype(np.float32)
                reps = args.reps if batch > 1 else args.reps * 4
                load_before = os.getloadavg()[0]
                stats = summarize(time_variants(model, plain, x, reps))
                # Other processes on this 2-core machine move on/off by 1.25-1.6x for the same
                # graph (memory-bound statistic passes suffer more than the convolutions):
                # keep the 1-minute load average with every row.
                stats["loadavg_1min"] = [load_before, os.getloadavg()[0]]
                results["models"].setdefault(name, {})[str(batch)] = stats
                m = stats["median_ms"]
                print(
                    f"{name:10s} {batch:5d} {m['plain']:8.3f} {m['off']:8.3f} {m['on']:8.3f} "
                    f"{stats['paired_off_vs_plain']:9.3f} {stats['paired_on_vs_off']:7.3f} "
                    f"{m['off_run']:8.3f} {m['on_run']:8.3f} "
                    f"{stats['paired_on_run_vs_off_run']:10.3f} {stats['loadavg_1min'][1]:5.2f}"
                )
        print(
            "median ms per run; ratios: median of per-round paired ratios; off/on: the "
            "sessions only; *_run: LoadedModel.run end to end (checks, softmax, aggregation); "
            "load: 1-minute load average after the row"
        )
        if args.memory:
            exported["wide_dense"] = export_wide(Path(tmp))
            results["memory_rss_mib"] = measure_memory(exported)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
