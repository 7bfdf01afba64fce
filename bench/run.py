"""Serving benchmark: our service against raw onnxruntime, the HTTP ceiling, a naive server,
LitServe and BentoML, side by side in one run; prints a table and writes JSON.

    python bench/run.py --out bench/results/run.json          # full (~30 min)
    python bench/run.py --quick --out /tmp/quick.json         # smoke run (~1 min)
    python bench/run.py --overload --out bench/results/overload.json   # 64 against 256 clients

Rows, for the default model (digits, 1x8x8) and a ResNet-20 (3x32x32, random weights, built
by bench/make_models.py), each at 1, 8 and 64 concurrent clients:

1. ``raw``: onnxruntime in-process, batch 1 and batched (the limit: best of batch 32/64,
   one session of 2 threads spinning on or off, or two 1-thread runs side by side), images/s;
2. ``noop``: FastAPI + uvicorn, one route that reads the body and answers a fixed JSON (the
   HTTP ceiling), same uvicorn options as ours (``python -m service``) in one process;
3. ``naive``: FastAPI + onnxruntime, pydantic model with JSON lists, one ``session.run`` per
   request (bench/apps/naive.py), the baseline;
4. ``litserve`` and ``bentoml`` serving the same ONNX file with their batching, from the
   separate venv ``.venv-bench`` (bench/setup_third_party.sh); a row says why it is missing;
5. ``ours``: JSON with a base64 tensor, raw ``application/octet-stream``, v2 binary tensor
   extension, multipart PNG upload; statistics off, and on (``stats=summary``) for JSON and
   binary. It runs with the service's own defaults (a worker process per CPU, the CPUs'
   onnxruntime threads divided among them, admission by ``RELU_SERVE_REQUEST_DEADLINE_S``)
   unless ``--ours-workers`` or ``--threads`` say otherwise; the JSON's ``settings.ours``
   has the workers and threads it resolved and the worker processes it really ran;
6. ``proto`` and ``proto-asgi``: issue 4's throwaway prototype (greedy batching, one inference
   thread, raw float32 bodies, no validation or metrics; bench/apps/prototype.py), on its own
   asyncio HTTP and as a plain ASGI app on uvicorn: what the ``x raw`` figure asks of a
   batching server with nothing else to do.

Load: wrk (Debian's ``apt-get install wrk``; ~20-40 us CPU per request) with one thread and
N connections (= clients), a Lua script per body, ``--duration`` seconds per cell, each cell
``--repeat`` times: the table shows medians, the JSON every repeat. CPU per request is the
server's process tree CPU time (``/proc/<pid>/stat``) over the requests it answered; the JSON
also has wrk's own (``client_cpu_us_per_request``, ~8-13 us here). Nothing is pinned to
cores: the server and wrk share the 2 cores as they would on a small host. Every server binds
127.0.0.1. The reference servers (every row but ``ours``) run ``--workers`` uvicorn workers, 1
by default: the issue's figures compare with the single-process no-op ceiling and naive
baseline.

After the table, per model, a bound for the ``x raw`` figure (``http_bounds``): a server whose
HTTP cost only what the no-op's does (its CPU and wrk's, per request) and whose inference
cost only what raw batched onnxruntime's does, with no core ever idle, could serve the cores'
CPU time divided by the sum of the two per request. Then the figures' three ratios once
more, paired (``--paired-rounds``, ``run_paired``): both sides measured back to back, round
after round, so that drifts in the host's speed cancel out; and the same ratios for the
prototypes.

``--overload`` runs, instead of all that, the overload figure: ours alone, ResNet-20 binary
requests, at 64 and 256 clients (or the two that ``--clients`` gives), both measured back to back
each of ``--paired-rounds`` rounds of ``--duration`` s; per client count the answered
requests/s, p50 and p99 (wrk's, of every response: 503s included when there are any), the
503s (wrk's status errors), and the ratio p99 at 256 / p99 at 64 per round, the median over
rounds (``overload`` in the JSON).

The code is in bench/serving/: ``inputs`` (the models and the requests), ``servers`` (each
server under test and how it is started and stopped), ``load`` (wrk, CPU time, raw
onnxruntime), ``matrix`` (the runs, the paired ratios, the overload runs) and ``report`` (medians,
ratios, the bound, the figures, the table, the overload figure). This module reads the
command line, runs the matrix (or the overload runs), prints the report and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serving.matrix import run_matrix, run_overload  # noqa: E402
from bench.serving.report import print_overload, print_report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults of --duration, --repeat, --clients and --paired-rounds
    depend on --quick and --overload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, few rows, 1 s")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (4)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per cell, median (3)")
    parser.add_argument(
        "--clients", default=None, help="concurrent clients (1,8,64; --overload: 64,256)"
    )
    parser.add_argument(
        "--overload",
        action="store_true",
        help="only the overload figure: ours, ResNet-20, two client counts, paired rounds",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn workers of the reference servers (1)"
    )
    parser.add_argument(
        "--ours-workers",
        type=int,
        default=None,
        help="our worker processes (default: the service's, one per CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="our onnxruntime threads per session (default: the service's, CPUs / workers)",
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
    if args.overload:
        args.clients = args.clients or "64,256"
    else:
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
    if args.overload:
        result = run_overload(args)
        print_overload(result)
    else:
        result = run_matrix(args)
        print_report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
