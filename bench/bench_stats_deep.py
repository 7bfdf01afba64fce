"""What activation statistics cost on a deep model: EfficientNet-like, statistics on vs off.

Exports ``tests.service.torch_models.EfficientNetLike`` (MBConv blocks with SiLU and
squeeze-and-excitation, 3x224x224, narrow) once, then for each source tree (``--tree``, default
this one; give the base commit's worktree for a before/after) starts a fresh process that
imports ``service`` from that tree, loads the model as the service does (``LoadedModel``) and

- times ``run_batch`` with statistics off and on, interleaved in random order per round, at
  batch 1 and 8: medians, and the median of the per-round on/off ratios (paired);
- measures the process's RSS after ``--requests`` batch-8 runs with statistics off, then
  after as many with statistics on (``LoadedModel.run``), the heap trimmed (malloc_trim)
  before each reading.

Targets (issue 16): on/off <= 1.3 at batch 1 and 8; RSS with statistics <= 1.25x without.

    python bench/bench_stats_deep.py --tree /tmp/base --tree . --out bench/results/stats_deep.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def child(path: str, rounds: int, requests: int, threads: int | None) -> dict:
    """(In a fresh process, ``service`` from the tree under test.) Timings and RSS."""
    from service.runtime.loaded_model import LoadedModel

    base = _rss_mib()
    model = LoadedModel.load(path, "m", "1", threads=threads)
    model.warm_up()
    loaded = _rss_mib()
    rng = np.random.default_rng(0)
    out: dict = {"rss_base_mib": base, "rss_loaded_mib": loaded}
    # RSS first, off then on, before the timings run the statistics session
    x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    for mode, key in (("none", "rss_off_mib"), ("summary", "rss_on_mib")):
        for _ in range(requests):
            model.run(x, mode)
        out[key] = _rss_mib()
    out["rss_on_vs_off"] = out["rss_on_mib"] / out["rss_off_mib"]
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for mode in ("none", "summary"):  # warm both at this size
            model.run_batch(x, mode)
            model.run_batch(x, mode)
        times: dict[str, list[float]] = {"none": [], "summary": []}
        for _ in range(rounds):
            order = ["none", "summary"]
            random.shuffle(order)
            for mode in order:
                start = time.perf_counter()
                model.run_batch(x, mode)
                times[mode].append(time.perf_counter() - start)
        off, on = np.array(times["none"]), np.array(times["summary"])
        out[f"batch{batch}"] = {
            "off_ms": float(np.median(off) * 1e3),
            "on_ms": float(np.median(on) * 1e3),
            "ratio_paired": float(np.median(on / off)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", help="source tree to import service from")
    parser.add_argument("--rounds", type=int, default=30, help="paired rounds per batch size")
    parser.add_argument("--requests", type=int, default=30, help="batch-8 runs for the RSS")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.requests, args.threads)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.service.torch_models import export_efficientnet_like

    results = {"cpus": os.cpu_count(), "rounds": args.rounds, "requests": args.requests}
    with tempfile.TemporaryDirectory() as folder:
        path = export_efficientnet_like(Path(folder) / "efficientnet_like.onnx")
        for tree in args.tree or [str(ROOT)]:
            cmd = [sys.executable, __file__, "--child", str(path), "--rounds", str(args.rounds),
                   "--requests", str(args.requests)]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[str(tree)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(tree, json.dumps(results[str(tree)], indent=1))  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
