"""``python -m service``: uvicorn's command line with our app first, and a clean exit."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from service.__main__ import main


def test_the_launcher_puts_our_app_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `python -m service` hands uvicorn: our app, then the caller's options as given.
    seen: dict[str, Any] = {}

    def fake_uvicorn_main(args: list[str], prog_name: str) -> None:
        seen.update(args=args, prog_name=prog_name, sigterm=signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr("uvicorn.main.main", fake_uvicorn_main)
    monkeypatch.setenv("RELU_SERVE_WORKERS", "3")
    before = signal.getsignal(signal.SIGTERM)
    main(["--port", "9", "--http", "h11"])
    # The worker count of the settings, unless the caller gives one.
    assert seen["args"] == ["service.main:app", "--port", "9", "--http", "h11", "--workers", "3"]
    assert seen["prog_name"] == "python -m service"
    # While uvicorn runs, a SIGTERM it does not handle (before it takes the signal over, or
    # raised again after its graceful shutdown) ends the process with status 0 ...
    with pytest.raises(SystemExit) as exit_info:
        seen["sigterm"](signal.SIGTERM, None)
    assert exit_info.value.code == 0
    # ... and the handler is given back afterwards.
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_callers_worker_count_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    # ... and reaches the workers' settings, which divide the CPUs among that many.
    seen: list[tuple[list[str], str]] = []

    def fake_uvicorn_main(args: list[str], prog_name: str) -> None:
        seen.append((args, os.environ["RELU_SERVE_WORKERS"]))

    monkeypatch.setattr("uvicorn.main.main", fake_uvicorn_main)
    monkeypatch.setenv("RELU_SERVE_WORKERS", "3")
    main(["--workers", "1"])
    main(["--workers=2"])
    main(["--reload"])  # uvicorn's reloader serves one process
    assert seen == [
        (["service.main:app", "--workers", "1"], "1"),
        (["service.main:app", "--workers=2"], "2"),
        (["service.main:app", "--reload"], "3"),
    ]
    assert os.environ["RELU_SERVE_WORKERS"] == "3"


def test_workers_share_a_fresh_folder_removed_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every worker inherits the folder and prometheus_client's multiprocess folder in it.
    monkeypatch.delenv("RELU_SERVE_SHARED_DIR", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    seen: dict[str, str] = {}

    def fake_uvicorn_main(args: list[str], prog_name: str) -> None:
        seen["shared"] = os.environ["RELU_SERVE_SHARED_DIR"]
        seen["metrics"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        assert sorted(p.name for p in Path(seen["shared"]).iterdir()) == ["metrics", "monitor"]

    monkeypatch.setattr("uvicorn.main.main", fake_uvicorn_main)
    main(["--workers", "2"])
    assert seen["metrics"] == str(Path(seen["shared"]) / "metrics")
    assert not Path(seen["shared"]).exists()
    assert "RELU_SERVE_SHARED_DIR" not in os.environ
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_a_given_shared_folder_is_kept_and_its_counts_emptied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Counts of an earlier run must not be read as this run's; the folder itself stays.
    stale = tmp_path / "metrics" / "counter_1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("the user's")
    monkeypatch.setenv("RELU_SERVE_SHARED_DIR", str(tmp_path))
    monkeypatch.setattr("uvicorn.main.main", lambda args, prog_name: None)
    main(["--workers", "1"])
    assert not stale.exists()
    assert (tmp_path / "metrics").is_dir()
    assert (tmp_path / "keep.txt").exists()
