"""Smoke tests of the serving benchmark (bench/run.py): in quick mode servers start, wrk drives
them, the table and the JSON come out; the overload runs measure two client counts in
alternation; the overload figure's arithmetic. The runs need wrk; not LitServe or BentoML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.serving.report import summarize_overload

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"
)


@pytest.mark.slow
@pytest.mark.network
@needs_wrk
def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick.json"
    run.main(["--quick", "--clients", "1,4", "--out", str(out), "--models-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert result["raw"]["digits"]["batched_ips"] > 0
    cells = {(c["server"], c["request"], c["clients"]): c for c in result["cells"]}
    for key in [
        ("noop", "binary", 4),
        ("naive", "json-lists", 4),
        ("ours", "binary", 1),
        ("ours", "json-b64", 4),
        ("ours", "binary+stats", 4),
        ("proto", "binary", 4),
        ("proto-asgi", "binary", 4),
    ]:
        cell = cells[key]
        assert "error" not in cell, cell
        assert cell["rps"] > 0
        assert cell["errors"] == 0
        assert cell["p99_ms"] >= cell["p50_ms"] > 0
        assert cell["cpu_us_per_request"] > 0
    assert cells[("ours", "binary", 4)]["x_naive"] is not None
    assert cells[("noop", "binary", 4)]["client_cpu_us_per_request"] > 0  # wrk's own CPU
    bound = result["bounds"]["digits"]  # no-op HTTP + raw compute, at 4 clients
    assert 0 < bound["bound_x_raw"] < 1
    assert bound["ours_x_bound"] > 0
    pair = result["paired"]["pairs"]["digits: ours / noop"]  # both servers, alternately
    assert len(pair["ratios"]) == 2
    assert pair["ratio"] > 0
    assert "resnet20: ours / raw batched" not in result["paired"]["pairs"]  # no ResNet here
    assert result["paired"]["pairs"]["digits: proto-asgi / noop"]["ratio"] > 0
    # The experiments' pairs are reported apart, not as figures of the service.
    assert not any("proto" in f["figure"] for f in result["figures"])
    # Ours ran the service's defaults: as many workers as it resolved, the threads divided.
    ours = result["settings"]["ours"]
    assert ours["worker_processes"] == ours["workers"] >= 1
    assert ours["intra_op_threads"] >= 1
    assert result["settings"]["uvicorn_workers"] == 1  # the references: one process
    assert not any(c["server"] == "ours-mp" for c in result["cells"])
    out = capsys.readouterr().out
    assert "figures:" in out
    assert "experiments, not figures: proto = " in out


@pytest.mark.slow
@pytest.mark.network
@needs_wrk
def test_overload_measures_both_client_counts_in_alternation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overload.json"
    argv = ["--overload", "--clients", "16,2", "--paired-rounds", "2", "--duration", "1"]
    argv += ["--ours-workers", "1", "--threads", "1"]
    run.main([*argv, "--out", str(out), "--models-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert result["settings"]["ours"] == {
        "workers": 1,
        "intra_op_threads": 1,
        "worker_processes": 1,
    }
    overload = result["overload"]
    assert (overload["model"], overload["request"]) == ("resnet20", "binary")
    low, high = overload["levels"]
    assert (low["clients"], high["clients"]) == (2, 16)  # fewest first
    for level in (low, high):
        assert len(level["runs"]) == 2
        assert level["rps"] > 0
        assert level["refused"] == level["socket_errors"] == 0
    assert len(overload["p99_ratios"]) == 2
    assert "p99 at 16 / p99 at 2 clients, paired" in capsys.readouterr().out
    assert "cells" not in result  # the matrix did not run


def _run(rps: float, p50_ms: float, p99_ms: float, refused: int = 0) -> dict[str, Any]:
    """A fake wrk run as bench/serving/load.py's run_wrk returns it."""
    return {
        "rps": rps,
        "p50_ms": p50_ms,
        "p99_ms": p99_ms,
        "status_errors": refused,
        "socket_errors": 0,
        "requests": 1000 + refused,
    }


def test_overload_figure_pairs_p99_per_round_and_counts_refusals() -> None:
    low = [_run(1000, 20, 30), _run(900, 22, 40), _run(1100, 18, 25)]
    high = [_run(1050, 80, 120, 5), _run(950, 90, 100), _run(1000, 85, 125, 2)]
    summary = summarize_overload([64, 256], [low, high])
    assert summary["p99_ratios"] == pytest.approx([4.0, 2.5, 5.0])  # round by round
    assert summary["p99_ratio"] == pytest.approx(4.0)  # their median, not 120 / 30
    at64, at256 = summary["levels"]
    assert (at64["clients"], at256["clients"]) == (64, 256)
    assert (at64["refused"], at256["refused"]) == (0, 7)
    assert at256["p99_ms"] == 120
    assert at256["p50_ms"] == 85
    assert at64["rps"] == 1000
    assert summary["latency_includes_refused"] is True
    assert summarize_overload([64, 256], [low, low])["latency_includes_refused"] is False
