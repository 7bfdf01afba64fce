"""Smoke test of the serving benchmark (bench/run.py) in quick mode: servers start, wrk
drives them, the table and the JSON come out. Needs wrk; not LitServe or BentoML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import run

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
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
    assert "figures:" in capsys.readouterr().out
