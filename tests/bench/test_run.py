"""Smoke test of the serving benchmark (bench/run.py) in quick mode: servers start, wrk
drives them, the table and the JSON come out. Needs wrk; not LitServe or BentoML."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from bench import run
from bench.serving import load, servers
from bench.serving.inputs import octet_stream

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
        ("ours-mp", "binary", 4),
        ("ours-mp", "binary+stats", 4),
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
    for label in ("digits: ours-mp / noop", "digits: proto-asgi / noop"):
        assert result["paired"]["pairs"][label]["ratio"] > 0
    assert bound["ours_mp_x_bound"] > 0
    # The experiments' pairs are reported apart, not as figures of the service.
    assert not any(k in f["figure"] for f in result["figures"] for k in ("ours-mp", "proto"))
    out = capsys.readouterr().out
    assert "figures:" in out
    assert "experiments, not figures: ours-mp = 2 processes" in out


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
def test_reuseport_serves_from_every_copy_and_stops_them(tmp_path: Path) -> None:
    """Two copies of the no-op server on one port: 32 keep-alive connections reach both, each
    doing a share of the work (the kernel hashes each connection to a socket: a split worse
    than 3 / 29 has a chance of ~1 in 4 million), and SIGTERM to the launcher stops both."""
    port = servers.free_port()
    argv = servers.reuseport_argv(2, [servers.PY, "-m", "uvicorn", "bench.apps.noop:app"])
    server = servers.Server("noop-2p", argv, {}, "/health")
    proc = servers.start_server(server, port, tmp_path / "log")
    try:
        children = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        assert len(children) == 2
        before = [load.tree_cpu_seconds(c) for c in children]
        request = octet_stream("/noop", b"x" * 64)
        result = load.run_wrk(port, request, 32, 2, tmp_path, proc.pid)
        assert result["errors"] == 0
        assert result["requests"] > 100
        used = [load.tree_cpu_seconds(c) - b for c, b in zip(children, before, strict=True)]
        assert min(used) > 0.1 * max(used), used  # each process did a share of the work
        os.kill(proc.pid, signal.SIGTERM)  # the launcher alone: it stops its copies
        assert proc.wait(15) == 0
        assert not any(Path(f"/proc/{child}").exists() for child in children)  # reaped
    finally:
        servers.stop_server(proc)
