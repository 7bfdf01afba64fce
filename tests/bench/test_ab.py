"""Smoke test of the paired A/B benchmark (bench/bench_ab.py): two variants of the service
side by side (one with a setting off and one worker, the other the defaults), alternated over
rounds, the paired ratio, the settings each ran with and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_ab

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_two_variants_are_measured_in_alternation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ab.json"
    argv = ["--a-env", "RELU_SERVE_DIRECT_DISPATCH=false", "--a-env", "RELU_SERVE_WORKERS=1"]
    argv += ["--rounds", "2", "--duration", "1"]
    argv += ["--clients", "4", "--models-dir", str(tmp_path / "models"), "--out", str(out)]
    assert bench_ab.main(argv) == 0
    result = json.loads(out.read_text())
    a, b = result["variants"]["A"], result["variants"]["B"]
    assert a["env"]["RELU_SERVE_DIRECT_DISPATCH"] == "false"
    assert "RELU_SERVE_DIRECT_DISPATCH" not in b["env"]
    # A: one process with all the CPUs' threads; B: the service's default workers, the CPUs
    # divided among them; each as it resolved its settings and as it ran.
    assert a["settings"]["workers"] == a["settings"]["worker_processes"] == 1
    assert b["settings"]["worker_processes"] == b["settings"]["workers"]
    assert a["settings"]["intra_op_threads"] == b["settings"]["workers"]
    assert "RELU_SERVE_MAX_QUEUE_LENGTH" not in a["env"]  # admission by time, the default
    assert len(a["rps"]) == len(b["rps"]) == 2
    assert all(rate > 0 for rate in a["rps"] + b["rps"])
    ratios = [y / x for x, y in zip(a["rps"], b["rps"], strict=True)]
    assert result["ratios"] == pytest.approx(ratios)
    assert min(ratios) <= result["ratio_b_over_a"] <= max(ratios)
    assert "B/A paired" in capsys.readouterr().out
