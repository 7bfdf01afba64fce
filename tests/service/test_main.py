"""``python -m service``: uvicorn's command line with our app first, and a clean exit."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from service.__main__ import main


def test_the_launcher_puts_our_app_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `python -m service` hands uvicorn: our app, then the caller's options as given.
    seen: dict[str, Any] = {}

    def fake_uvicorn_main(args: list[str], prog_name: str) -> None:
        seen.update(args=args, prog_name=prog_name, sigterm=signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr("uvicorn.main.main", fake_uvicorn_main)
    before = signal.getsignal(signal.SIGTERM)
    main(["--port", "9", "--http", "h11"])
    assert seen["args"] == ["service.main:app", "--port", "9", "--http", "h11"]
    assert seen["prog_name"] == "python -m service"
    # While uvicorn runs, a SIGTERM it does not handle (before it takes the signal over, or
    # raised again after its graceful shutdown) ends the process with status 0 ...
    with pytest.raises(SystemExit) as exit_info:
        seen["sigterm"](signal.SIGTERM, None)
    assert exit_info.value.code == 0
    # ... and the handler is given back afterwards.
    assert signal.getsignal(signal.SIGTERM) == before
