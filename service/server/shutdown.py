"""Graceful shutdown: on SIGTERM, readiness turns 503 first; then uvicorn drains and exits.

Kubernetes sends SIGTERM and removes the pod from the Service's endpoints at the same time,
and the endpoint change reaches kube-proxy and ingress controllers only after a while. A
server that closes its listener at once refuses the requests still routed to it meanwhile
(the "preStop sleep" problem: https://kubernetes.io/docs/concepts/workloads/pods/
pod-lifecycle/#pod-termination). So, on SIGTERM:

1. readiness turns false at once: ``/health/ready`` and ``/v2/health/ready`` answer 503;
2. the server keeps serving for ``shutdown_delay_s`` (``RELU_SERVE_SHUTDOWN_DELAY_S``), long
   enough for load balancers to see the 503 or the endpoint removal;
3. then ``on_stop`` runs (the model manager kills the validations in progress: their
   requests answer 503 at once instead of holding the drain for up to
   ``validation_timeout_s``), and the signal goes to uvicorn's own handler, which stops
   accepting, lets requests in flight finish (``--timeout-graceful-shutdown``), runs the
   lifespan shutdown (the data plane drains its workers) and raises SIGTERM again;
   ``python -m service`` answers that with status 0 (a requested, clean stop is a success,
   as gunicorn counts it), where plain ``uvicorn`` dies by the signal (status 143).

A second SIGTERM during the delay skips the rest of it. SIGINT (Ctrl+C) is left to uvicorn.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Metrics(Protocol):
    @property
    def ready(self) -> _Gauge: ...


class Drainable(Protocol):
    """What the shutdown needs of the data plane: its readiness flag and gauge."""

    ready: bool

    @property
    def metrics(self) -> _Metrics: ...


class GracefulShutdown:
    """Installs a SIGTERM handler in front of the server's own (uvicorn's) for one lifespan."""

    def __init__(
        self, plane: Drainable, delay_s: float, on_stop: Callable[[], None] | None = None
    ) -> None:
        self.plane = plane
        self.delay_s = delay_s
        self.on_stop = on_stop  # called from the signal handler or the delay's thread
        self.draining = False
        self._original: Any = None
        self._timer: threading.Timer | None = None
        self._installed = False

    def install(self) -> None:
        """Take over SIGTERM, keeping the server's handler to call later; a no-op off the main
        thread (TestClient runs the lifespan in a worker thread) or when no server handles
        SIGTERM in Python (then there is nothing to delay)."""
        if threading.current_thread() is not threading.main_thread():
            return
        original = signal.getsignal(signal.SIGTERM)
        if not callable(original):
            logger.debug("SIGTERM has no Python handler (%r): no graceful delay", original)
            return
        self._original = original
        signal.signal(signal.SIGTERM, self._handle_sigterm)
        self._installed = True

    def uninstall(self) -> None:
        """Give SIGTERM back to the server's handler (at the end of the lifespan)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._handle_sigterm:
                signal.signal(signal.SIGTERM, self._original)
            self._installed = False

    def _handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Readiness off now; stop the server after the delay (at once on a second SIGTERM)."""
        if self.draining:
            logger.info("second SIGTERM: stopping now")
            if self._timer is not None:
                self._timer.cancel()
            self._stop_server(signum, frame)
            return
        self.draining = True
        self.plane.ready = False
        self.plane.metrics.ready.set(0)
        if self.delay_s <= 0:
            logger.info("SIGTERM: not ready; stopping")
            self._stop_server(signum, frame)
            return
        logger.info("SIGTERM: not ready; still serving for %.1f s, then stopping", self.delay_s)
        # A thread, not the event loop: this handler may run between any two bytecodes of the
        # loop's own thread, where scheduling on the loop is not safe.
        self._timer = threading.Timer(self.delay_s, self._stop_server, args=(signum, None))
        self._timer.daemon = True
        self._timer.start()

    def _stop_server(self, signum: int, frame: FrameType | None) -> None:
        """Hand the signal to the server's own handler: uvicorn stops, drains and, once shut
        down, raises the signal again (``python -m service`` turns that into status 0).
        ``on_stop`` first."""
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception:  # the server must stop whatever the callback did
                logger.exception("on_stop callback of the graceful shutdown")
        self._original(signum, frame)
