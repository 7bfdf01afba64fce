"""``python -m service [uvicorn options]``: uvicorn serving ``service.main:app`` in
``RELU_SERVE_WORKERS`` worker processes, and a requested stop (SIGTERM) that ends with status 0.

Every uvicorn option works as on uvicorn's own command line (``--host``, ``--port``,
``--log-level``, ``--reload``, ...); ``--workers N`` overrides ``RELU_SERVE_WORKERS`` (default:
the CPUs the container may use). With more than one, uvicorn's supervisor runs the workers on
one listening socket, replaces a worker that dies and, on SIGTERM, stops each of them
gracefully (readiness 503 first, requests in flight finish).

Where the command line says nothing, the settings bound what a client can hold: requests in
flight at a stop get ``RELU_SERVE_GRACEFUL_TIMEOUT_S`` (``--timeout-graceful-shutdown``),
idle connections ``RELU_SERVE_KEEP_ALIVE_TIMEOUT_S`` (``--timeout-keep-alive``), and HTTP is
served by ``service.server.http`` (request head size and count, header and body timeouts, a
connection cap) unless ``RELU_SERVE_HTTP_GUARD=false`` or ``--http h11`` is given.

The workers share what a client sees: the model repository on disk (each converges on it
within ``RELU_SERVE_REPOSITORY_POLL_S``), and a folder, ``RELU_SERVE_SHARED_DIR``, made here
fresh for this run when unset, where the live monitor's counts and the metrics
(prometheus_client's multiprocess files, ``PROMETHEUS_MULTIPROC_DIR``) of every worker are
kept, so that any worker answers for all. ``uvicorn service.main:app`` serves one process
with everything in its own memory; it dies by the SIGTERM that stops it (status 143).

Subcommands (``python -m service COMMAND --help`` for each):
  describe MODEL.onnx [--labels FILE] [--preset imagenet]
                                write a model's config.json (docs/models.md)
  calibrate NAME --images DIR   measure a model's reference profile for drift (reference.json)
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click
from uvicorn.main import main as uvicorn_command

from service.server.http import PROTOCOL
from service.settings import load_settings

APP = "service.main:app"
PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
SHARED_DIR_VARIABLE = "RELU_SERVE_SHARED_DIR"
WORKERS_VARIABLE = "RELU_SERVE_WORKERS"
# The parts of the shared folder emptied at every start: counts of an earlier run would be
# read as this one's (prometheus_client requires an empty multiprocess folder at start).
SHARED_PARTS = ("metrics", "monitor")
# ``python -m service NAME ...``: subcommands, each the module whose ``main(argv) -> int``
# runs it; anything else is the server.
SUBCOMMANDS = {
    "describe": "service.describe",  # write a model's config.json (docs/models.md)
    "calibrate": "service.calibrate",  # measure a reference profile (reference.json)
}


def main(argv: list[str] | None = None) -> None:
    """Run uvicorn's command line with our app first, and the settings' worker count, time
    limits and HTTP protocol where the command line gives none."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:]))
    if "--help" in args:
        sys.stdout.write(__doc__.replace("``", "`").strip() + "\n\n")
    given = _option_value(args, "--workers")
    http = None
    if "--help" not in args:
        settings = load_settings()
        if given is None and "--reload" not in args:  # the reloader runs one process
            args = [*args, "--workers", str(settings.workers)]
        for option, value in (
            ("--timeout-graceful-shutdown", settings.graceful_timeout_s),
            ("--timeout-keep-alive", settings.keep_alive_timeout_s),
        ):
            if _option_value(args, option) is None:
                args = [*args, option, str(max(1, math.ceil(value)))]
        if settings.http_guard and _option_value(args, "--http") in (None, "auto", "httptools"):
            http = PROTOCOL
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        with shared_folder(workers=given):
            _run_uvicorn([APP, *args], http)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_uvicorn(args: list[str], http: str | None) -> None:
    """uvicorn's command line; ``http``, an import path, replaces its HTTP protocol (which
    its ``Config`` takes, but its ``--http`` option does not)."""
    if http is None:
        uvicorn_command.main(args, prog_name="python -m service")  # exits when done
    try:
        with uvicorn_command.make_context("python -m service", args) as context:
            context.params["http"] = http
            uvicorn_command.invoke(context)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def _option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` on a command line (``--opt V`` or ``--opt=V``) or in uvicorn's
    variable for it (``UVICORN_OPT``), else None."""
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return os.environ.get("UVICORN_" + option.lstrip("-").replace("-", "_").upper())


@contextmanager
def shared_folder(workers: str | None = None) -> Iterator[Path]:
    """The workers' shared folder, in the environment they inherit: ``RELU_SERVE_SHARED_DIR``
    with its parts emptied, or a fresh temporary folder removed at the end; and
    ``RELU_SERVE_WORKERS`` set to ``workers`` when the command line gives a count, so each
    worker divides the CPUs among as many as run."""
    given = os.environ.get(SHARED_DIR_VARIABLE)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="relu-serve-"))
    for part in SHARED_PARTS:
        shutil.rmtree(folder / part, ignore_errors=True)
        (folder / part).mkdir(parents=True)
    names = (SHARED_DIR_VARIABLE, PROMETHEUS_DIR_VARIABLE, WORKERS_VARIABLE)
    saved = {name: os.environ.get(name) for name in names}
    if workers is not None:
        os.environ[WORKERS_VARIABLE] = workers
    os.environ[SHARED_DIR_VARIABLE] = str(folder)
    os.environ[PROMETHEUS_DIR_VARIABLE] = str(folder / "metrics")
    try:
        yield folder
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's own handler: before it takes the signal over, and when it
    raises the signal again after a graceful shutdown. A requested stop is a success
    (gunicorn counts it so too): status 0, where uvicorn alone dies by the signal (143)."""
    raise SystemExit(0)


if __name__ == "__main__":
    main()
