"""The runs: raw onnxruntime first, then every server for each of its requests and each
client count, ``--repeat`` times a cell; then the paired ratios, both sides of a figure
measured back to back round after round. Or, with ``--overload``, only ours on ResNet-20 at
two client counts, alternated the same way. Builds the result that bench/run.py prints and
writes as JSON."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench.make_models import build_repository
from bench.serving.inputs import MODELS
from bench.serving.load import check_request, measure_raw, raw_rate, raw_session, run_wrk
from bench.serving.report import (
    EXPERIMENT_PAIRS,
    PAIRS,
    add_ratios,
    check_figures,
    format_row,
    http_bounds,
    summarize_cell,
    summarize_overload,
)
from bench.serving.servers import (
    Server,
    build_servers,
    free_port,
    ours_settings,
    start_server,
    stop_server,
)

Side = TypeVar("Side")
OVERLOAD_MODEL, OVERLOAD_REQUEST = "resnet20", "binary"


def alternate(
    rounds: int,
    sides: Sequence[Side],
    measure: Callable[[Side], Any],
    after_round: Callable[[int, list[list[Any]]], None] | None = None,
) -> list[list[Any]]:
    """``measure`` of every side once a round, back to back, the order reversed every other
    round, so that drifts in the host's speed hit all sides alike: one list per side, a value
    per round. ``after_round(i, values)`` is called after each round (progress)."""
    values: list[list[Any]] = [[] for _ in sides]
    for i in range(rounds):
        order = list(range(len(sides)))
        for k in order if i % 2 == 0 else order[::-1]:
            values[k].append(measure(sides[k]))
        if after_round:
            after_round(i, values)
    return values


def _settings(args: argparse.Namespace, clients: list[int]) -> dict[str, Any]:
    """The run's settings for the JSON (ours' resolved workers and threads are added once it
    runs)."""
    return {
        "duration_s": args.duration,
        "repeat": args.repeat,
        "clients": clients,
        "uvicorn_workers": args.workers,
        "ours_workers": args.ours_workers,
        "ours_intra_op_threads": args.threads,
        "ours_env": args.ours_env,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


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
        "settings": _settings(args, clients),
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
                if server.name == "ours":  # what it runs with: workers and threads
                    result["settings"]["ours"] = ours_settings(server, proc)
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
            tops, bottoms = alternate(
                args.paired_rounds,
                (top, bottom),
                lambda side: measure(side, clients, args.duration),
            )
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


def run_overload(args: argparse.Namespace) -> dict[str, Any]:
    """Ours alone on ResNet-20 binary requests at the two ``--clients`` counts (64 and 256),
    both measured back to back each of ``--paired-rounds`` rounds: answered requests/s,
    latency, refusals (503) and the paired ratio of p99 at the most clients to the fewest."""
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found; install it with `apt-get install -y wrk`")
    levels = sorted(int(c) for c in args.clients.split(","))
    if len(levels) != 2:
        raise SystemExit(f"error: --overload takes two client counts, not {args.clients!r}")
    repo = build_repository(args.models_dir)
    servers, _ = build_servers(repo, [OVERLOAD_MODEL], args)
    ours = next(s for s in servers if s.name == "ours")
    request = ours.requests[f"{OVERLOAD_MODEL}:{OVERLOAD_REQUEST}"]
    result: dict[str, Any] = {"settings": _settings(args, levels)}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir, port = Path(tmp), free_port()
        proc = start_server(ours, port, workdir / "ours.log")
        try:
            result["settings"]["ours"] = ours_settings(ours, proc)
            problem = check_request(port, request)
            if problem is not None:
                raise RuntimeError(f"ours does not answer: {problem}")
            run_wrk(port, request, 8, 2, workdir, proc.pid)  # warm-up

            def measure(clients: int) -> dict[str, Any]:
                run = run_wrk(port, request, clients, args.duration, workdir, proc.pid)
                if "error" in run:
                    raise RuntimeError(f"{clients} clients: {run['error']}")
                return run

            def progress(i: int, runs: list[list[dict[str, Any]]]) -> None:
                line = ", ".join(
                    f"{c} clients {r[-1]['rps']:.0f} req/s p99 {r[-1]['p99_ms']:.1f} ms "
                    f"{r[-1]['status_errors']} refused"
                    for c, r in zip(levels, runs, strict=True)
                )
                print(f"overload round {i + 1}: {line}", flush=True)

            runs = alternate(args.paired_rounds, levels, measure, progress)
        finally:
            stop_server(proc)
    result["overload"] = {
        "model": OVERLOAD_MODEL,
        "request": OVERLOAD_REQUEST,
        "rounds": args.paired_rounds,
        **summarize_overload(levels, runs),
    }
    result["settings"]["loadavg_end"] = os.getloadavg()
    return result
