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

    def fake_uvicorn(args: list[str], http: str | None) -> None:
        seen.update(args=args, http=http, sigterm=signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr("service.__main__._run_uvicorn", fake_uvicorn)
    monkeypatch.setenv("RELU_SERVE_WORKERS", "3")
    monkeypatch.setenv("RELU_SERVE_GRACEFUL_TIMEOUT_S", "12.5")
    before = signal.getsignal(signal.SIGTERM)
    main(["--port", "9", "--http", "h11", "--timeout-keep-alive", "7"])
    # The worker count and the graceful stop's bound of the settings, unless the caller
    # gives them; the caller's HTTP protocol (h11: uvicorn's own, without our limits).
    assert seen["args"] == [
        "service.main:app",
        *("--port", "9", "--http", "h11", "--timeout-keep-alive", "7"),
        *("--workers", "3", "--timeout-graceful-shutdown", "13"),
    ]
    assert seen["http"] is None
    # uvicorn's variables for its options count as given (deploy/ sets one).
    monkeypatch.setenv("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", "40")
    main(["--workers", "1"])
    assert "--timeout-graceful-shutdown" not in seen["args"]
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

    def fake_uvicorn(args: list[str], http: str | None) -> None:
        seen.append((args[:3], os.environ["RELU_SERVE_WORKERS"]))

    monkeypatch.setattr("service.__main__._run_uvicorn", fake_uvicorn)
    monkeypatch.setenv("RELU_SERVE_WORKERS", "3")
    main(["--workers", "1"])
    main(["--workers=2"])
    main(["--reload"])  # uvicorn's reloader serves one process
    assert seen == [
        (["service.main:app", "--workers", "1"], "1"),
        (["service.main:app", "--workers=2", "--timeout-graceful-shutdown"], "2"),
        (["service.main:app", "--reload", "--timeout-graceful-shutdown"], "3"),
    ]
    assert os.environ["RELU_SERVE_WORKERS"] == "3"


def test_workers_share_a_fresh_folder_removed_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every worker inherits the folder and prometheus_client's multiprocess folder in it.
    monkeypatch.delenv("RELU_SERVE_SHARED_DIR", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    seen: dict[str, str] = {}

    def fake_uvicorn(args: list[str], http: str | None) -> None:
        seen["shared"] = os.environ["RELU_SERVE_SHARED_DIR"]
        seen["metrics"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        assert sorted(p.name for p in Path(seen["shared"]).iterdir()) == ["metrics", "monitor"]

    monkeypatch.setattr("service.__main__._run_uvicorn", fake_uvicorn)
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
    monkeypatch.setattr("service.__main__._run_uvicorn", lambda args, http: None)
    main(["--workers", "1"])
    assert not stale.exists()
    assert (tmp_path / "metrics").is_dir()
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize(
    ("env", "args", "guarded"),
    [
        ({}, [], True),
        ({}, ["--http", "httptools"], True),
        ({}, ["--http=h11"], False),  # the caller's choice: uvicorn's h11, no guard
        ({"RELU_SERVE_HTTP_GUARD": "false"}, [], False),
        ({"UVICORN_HTTP": "h11"}, [], False),  # uvicorn's own variable for --http
    ],
)
def test_http_is_served_with_our_limits_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], guarded: bool
) -> None:
    seen: dict[str, str | None] = {}
    monkeypatch.setattr("service.__main__._run_uvicorn", lambda a, http: seen.update(http=http))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["--workers", "1", *args])
    assert seen["http"] == ("service.server.http:GuardedHttpToolsProtocol" if guarded else None)
