"""Logging set-up for the service's own loggers (uvicorn configures its own)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send ``service.*`` records at ``level`` and above to stderr, once."""
    logger = logging.getLogger("service")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_relu_serve", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._relu_serve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
