"""A/B of two ways to run the service: paired rounds of wrk on one model at one load.

Each variant is ``python -m service`` with its own ``RELU_SERVE_*`` settings and, optionally,
its own source tree (another checkout, e.g. ``git worktree add /tmp/before <commit>``), all
serving the benchmark's repository (bench/make_models.py) with the same interpreter. Both
servers run side by side; every round measures each once, back to back, the order swapped
every round, so that drifts in the host's speed hit both sides alike; the figure is the
median of the per-round ratios B / A (requests per second). Used for the framework
shortcuts (``service/server/``: kept only where they are worth it) and for restructures
(throughput against the commit before).

Both run the service's defaults but for what ``--a-env`` and ``--b-env`` set (its worker
processes and threads too: the JSON has what each resolved and ran).

    python bench/bench_ab.py --a-env RELU_SERVE_DIRECT_DISPATCH=false --out ab.json
    python bench/bench_ab.py --a-tree /tmp/before --model resnet20 --request binary
    python bench/bench_ab.py --a-env RELU_SERVE_WORKERS=1 --model resnet20   # workers vs one
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.make_models import build_repository  # noqa: E402
from bench.serving.inputs import MODELS, our_requests, sample_input  # noqa: E402
from bench.serving.load import run_wrk  # noqa: E402
from bench.serving.matrix import alternate  # noqa: E402
from bench.serving.servers import (  # noqa: E402
    PY,
    ROOT,
    Server,
    free_port,
    ours_settings,
    start_server,
    stop_server,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for side in ("a", "b"):
        parser.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"a setting of variant {side.upper()} (repeatable)",
        )
        parser.add_argument(
            f"--{side}-tree", type=Path, default=ROOT, help=f"source tree of variant {side}"
        )
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument(
        "--request", default="binary", help="request kind (bench/serving/inputs.py)"
    )
    parser.add_argument("--clients", type=int, default=64, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument(
        "--models-dir", type=Path, default=ROOT / "bench" / ".models", help="model repository"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    return parser.parse_args(argv)


def variant(name: str, settings: list[str], tree: Path, repo: Path) -> Server:
    """``python -m service`` from ``tree`` with ``settings`` (KEY=VALUE) on ``repo``."""
    # No queue bound of its own: admission by time (RELU_SERVE_REQUEST_DEADLINE_S) is the
    # service's default, and a 503 under the measured load fails the run.
    env = {
        "RELU_SERVE_MODEL_ROOT": str(repo),
        "RELU_SERVE_LOG_LEVEL": "warning",
        **dict(item.split("=", 1) for item in settings),
    }
    argv = [PY, "-m", "service", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log"]
    return Server(name, argv, env, "/health/ready", tree=tree.resolve())


def run_ab(args: argparse.Namespace) -> dict[str, Any]:
    """Start both variants, warm them up, run the paired rounds; the ratio B / A."""
    repo = build_repository(args.models_dir)
    input_name, x = sample_input(repo / args.model / "1" / "model.onnx")
    request = our_requests(args.model, input_name, x)[args.request]
    sides = [
        variant("A", args.a_env, args.a_tree, repo),
        variant("B", args.b_env, args.b_tree, repo),
    ]
    procs, ports, resolved = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            for server in sides:
                ports[server.name] = free_port()
                log = workdir / f"{server.name}.log"
                procs[server.name] = start_server(server, ports[server.name], log)
                resolved[server.name] = ours_settings(server, procs[server.name])

            def measure(server: Server, clients: int, seconds: float) -> dict[str, Any]:
                port, pid = ports[server.name], procs[server.name].pid
                cell = run_wrk(port, request, clients, seconds, workdir, pid)
                if "error" in cell or cell["errors"]:
                    raise RuntimeError(f"variant {server.name}: {cell}")
                return cell

            def progress(i: int, values: list[list[float]]) -> None:
                a, b = values[0][-1], values[1][-1]
                print(f"round {i + 1}: A {a:.0f}, B {b:.0f} req/s, B/A {b / a:.3f}", flush=True)

            for server in sides:
                measure(server, 8, 2)  # warm-up: first runs, caches, allocator
            a_rps, b_rps = alternate(
                args.rounds,
                sides,
                lambda server: measure(server, args.clients, args.duration)["rps"],
                progress,
            )
        finally:
            for proc in procs.values():
                stop_server(proc)
    rates = {"A": a_rps, "B": b_rps}
    ratios = [b / a for a, b in zip(a_rps, b_rps, strict=True)]
    return {
        "model": args.model,
        "request": args.request,
        "clients": args.clients,
        "duration_s": args.duration,
        "variants": {
            s.name: {
                "env": s.env,
                "tree": str(s.tree),
                "settings": resolved[s.name],
                "rps": rates[s.name],
            }
            for s in sides
        },
        "median_rps": {name: statistics.median(r) for name, r in rates.items()},
        "ratio_b_over_a": statistics.median(ratios),
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    """Run, print the medians and the paired ratio, write the JSON."""
    args = parse_args(argv)
    result = run_ab(args)
    med = result["median_rps"]
    print(
        f"{args.model} {args.request} at {args.clients} clients: A {med['A']:.0f}, "
        f"B {med['B']:.0f} req/s (medians); B/A paired {result['ratio_b_over_a']:.3f}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
