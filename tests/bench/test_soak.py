"""A short soak (``bench/soak.py``, 20 s instead of 5 minutes): 32 concurrent clients against a
real server, no failed request, bounded memory growth after warm-up, a clean exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.network]
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_has_no_errors_and_bounded_rss(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "bench/soak.py", "--duration", "20", "--warmup", "8"]
    command += ["--clients", "32", "--interval", "1", "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert out.is_file(), result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["requests"] > 1000, figures  # the load really ran
    assert figures["failed"] == 0, figures["errors"]
    assert figures["rss_growth_after_warmup_pct"] < 10, figures["rss_samples"]
    assert figures["server_exit_code"] == 0
    assert result.returncode == 0, result.stdout + result.stderr
