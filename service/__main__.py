"""``python -m service [uvicorn options]``: uvicorn serving ``service.main:app``, and a
requested stop (SIGTERM) that ends with status 0.

Every uvicorn option works as on uvicorn's own command line (``--host``, ``--port``,
``--workers``, ``--log-level``, ``--reload``, ...). ``uvicorn service.main:app`` serves the
same app; it dies by the SIGTERM that stops it (status 143).

``--workers N`` starts N independent copies: each loads the models and keeps its own model
changes, live statistics and metrics, and they share one listening socket unevenly
(docs/deployment.md, "One process per pod"). One process (the default) is the supported
way to run the service.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn.main

APP = "service.main:app"


def main(argv: list[str] | None = None) -> None:
    """Run uvicorn's command line with our app first."""
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args:
        sys.stdout.write(__doc__.replace("``", "`").strip() + "\n\n")
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.main.main([APP, *args], prog_name="python -m service")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's own handler: before it takes the signal over, and when it
    raises the signal again after a graceful shutdown. A requested stop is a success
    (gunicorn counts it so too): status 0, where uvicorn alone dies by the signal (143)."""
    raise SystemExit(0)


if __name__ == "__main__":
    main()
