"""Smoke test of the paired A/B benchmark (bench/bench_ab.py): two variants of the service
side by side, alternated over rounds, the paired ratio and the JSON."""

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
    argv = ["--a-env", "RELU_SERVE_DIRECT_DISPATCH=false", "--rounds", "2", "--duration", "1"]
    argv += ["--clients", "4", "--models-dir", str(tmp_path / "models"), "--out", str(out)]
    assert bench_ab.main(argv) == 0
    result = json.loads(out.read_text())
    a, b = result["variants"]["A"], result["variants"]["B"]
    assert a["env"]["RELU_SERVE_DIRECT_DISPATCH"] == "false"
    assert "RELU_SERVE_DIRECT_DISPATCH" not in b["env"]
    assert len(a["rps"]) == len(b["rps"]) == 2
    assert all(rate > 0 for rate in a["rps"] + b["rps"])
    ratios = [y / x for x, y in zip(a["rps"], b["rps"], strict=True)]
    assert result["ratios"] == pytest.approx(ratios)
    assert min(ratios) <= result["ratio_b_over_a"] <= max(ratios)
    assert "B/A paired" in capsys.readouterr().out
