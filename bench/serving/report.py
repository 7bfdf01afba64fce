"""From measurements to figures: each cell's medians over its repeats, its throughput as a
share of raw onnxruntime, the no-op and the naive server, the bound for the ``x raw`` figure
(no-op HTTP plus raw compute), the issue's figures with their targets, the table, the pairs
whose ratios are measured in alternation, and the overload figure (latency and refusals at 64
and 256 clients)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.serving.inputs import MODELS

# The figures' ratios measured once more in alternation: (name, numerator, denominator), each
# side a (server, "model:request") or "raw" (onnxruntime alone, batch 32, 2 threads).
PAIRS = (
    ("digits: ours / noop", ("ours", "digits:binary"), ("noop", "digits:binary")),
    ("resnet20: stats on / off", ("ours", "resnet20:binary+stats"), ("ours", "resnet20:binary")),
    ("resnet20: ours / raw batched", ("ours", "resnet20:binary"), "raw"),
)
# Not figures of the service: the same ratios for issue 4's prototype, bare and on uvicorn
# (bench/apps/prototype.py), the references for what the figures ask.
EXPERIMENT_PAIRS = (
    ("resnet20: proto / raw batched", ("proto", "resnet20:binary"), "raw"),
    ("resnet20: proto-asgi / raw batched", ("proto-asgi", "resnet20:binary"), "raw"),
    ("digits: proto-asgi / noop", ("proto-asgi", "digits:binary"), ("noop", "digits:binary")),
)


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
        bounds[model] = {
            "http_us_per_request": http_us,
            "compute_us_per_image": compute_us,
            "bound_rps": rps,
            "bound_x_raw": rps / raw["batched_ips"],
            "ours_x_bound": ours["rps"] / rps if ours else None,
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
        print(
            "\nexperiments, not figures: proto = issue 4's prototype (bench/apps/prototype.py), "
            "proto-asgi = on uvicorn:"
        )
    for label in experiments:
        print(f"  paired, {label:43} {pairs[label]['ratio']:>6.2f}")


def summarize_overload(levels: list[int], runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The overload figure from paired rounds: ``runs[k][i]`` is round ``i`` at ``levels[k]``
    clients (two levels, fewest first). Per level the medians of answered requests/s, p50 and
    p99 and the sum of refusals (wrk's status errors: 503 overloaded); the ratio of p99 at the
    most clients to p99 at the fewest, per round, and its median."""
    low, high = runs
    summary: dict[str, Any] = {"levels": []}
    for clients, level_runs in zip(levels, runs, strict=True):
        summary["levels"].append(
            {
                "clients": clients,
                "rps": statistics.median(r["rps"] for r in level_runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in level_runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in level_runs),
                "refused": sum(r["status_errors"] for r in level_runs),
                "socket_errors": sum(r["socket_errors"] for r in level_runs),
                "requests": sum(r["requests"] for r in level_runs),
                "runs": level_runs,
            }
        )
    ratios = [h["p99_ms"] / lo["p99_ms"] for lo, h in zip(low, high, strict=True)]
    summary["p99_ratios"] = ratios
    summary["p99_ratio"] = statistics.median(ratios)
    # wrk's percentiles are of every response: with refusals (answered at once) among them
    # they understate the answered requests' latency.
    summary["latency_includes_refused"] = any(level["refused"] for level in summary["levels"])
    return summary


def print_overload(result: dict[str, Any]) -> None:
    """The overload figure: a line per client count, then the paired p99 ratio."""
    overload, ours = result["overload"], result["settings"]["ours"]
    print(
        f"\noverload, {overload['model']} {overload['request']}, ours with "
        f"{ours['worker_processes']} workers x {ours['intra_op_threads']} threads, "
        f"{overload['rounds']} paired rounds of {result['settings']['duration_s']:g} s:"
    )
    print(f"  {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'503s':>7} {'sock err':>8}")
    for level in overload["levels"]:
        print(
            f"  {level['clients']:>7} {level['rps']:>8.0f} {level['p50_ms']:>8.2f} "
            f"{level['p99_ms']:>8.2f} {level['refused']:>7} {level['socket_errors']:>8}"
        )
    low, high = (level["clients"] for level in overload["levels"])
    rounds = ", ".join(f"{r:.2f}" for r in overload["p99_ratios"])
    print(f"  p99 at {high} / p99 at {low} clients, paired: {overload['p99_ratio']:.2f} ({rounds})")
    if overload["latency_includes_refused"]:
        print("  (latency percentiles include the refused requests: wrk's have no status)")
