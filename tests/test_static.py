"""Static checks over the whole tree, as a maintainer runs them: ruff's lint and format rules
(pyproject.toml) and mypy's type check of service/ and training/ (mypy.ini)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {
    "ruff lint": [sys.executable, "-m", "ruff", "check", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "."],
    "mypy": [sys.executable, "-m", "mypy"],
}


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_the_tree_is_clean(check: str) -> None:
    done = subprocess.run(CHECKS[check], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{check} failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
