"""Pure ASGI middleware: the request body limit and per-request metrics.

Pure ASGI rather than ``BaseHTTPMiddleware`` so a body is never buffered twice and streaming
reads keep working; both are cheap enough to sit in front of every request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.core.budget import MemoryBudget
from service.core.errors import PayloadTooLargeError, ServiceError
from service.core.metrics import ServiceMetrics


class BodyLimitMiddleware:
    """Refuse bodies over ``max_body_bytes`` with 413: at once when Content-Length says so,
    or as soon as a streamed (chunked) body passes the limit."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        path_limits: Mapping[str, tuple[int, str]] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Path prefix -> (limit, setting): model uploads take a larger limit of their own,
        # and stream to disk rather than to memory: only the others take from ``budget``.
        self.path_limits = dict(path_limits or {})
        self.budget = budget

    def _limit_for(self, path: str) -> tuple[int, str]:
        for prefix, limit in self.path_limits.items():
            if path.startswith(prefix):
                return limit
        return self.max_body_bytes, "max_body_bytes"

    def _error(self, size: str, limit: tuple[int, str]) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body of {size} bytes is over the limit of {limit[0]} bytes ({limit[1]})",
            code="body_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > limit[0]:
            await self._refuse(self._error(length.decode(), limit), scope, receive, send)
            return
        # Bytes of the budget this body holds: all it may be, taken before it is read.
        held = 0
        if length.isdigit():
            held = int(length)
        elif any(k == b"transfer-encoding" for k, _ in scope["headers"]):
            held = limit[0]  # chunked: as much as the limit lets through
        budget = self.budget if held and limit[1] == "max_body_bytes" else None
        if budget is not None:
            try:
                await budget.take(held, "the request body")
            except ServiceError as exc:
                await self._refuse(exc, scope, receive, send)
                return
        try:
            await self._receive_within(limit, length, scope, receive, send)
        finally:
            if budget is not None:
                budget.give(held)

    async def _refuse(self, exc: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            Request(scope), exc.status_code, exc.code, exc.message, exc.headers
        )
        # The client may still be sending: tell it the connection ends with this answer.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def _receive_within(
        self, limit: tuple[int, str], length: bytes, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if length.isdigit():  # the server reads no more than Content-Length
            await self.app(scope, receive, send)
            return
        received = 0  # a chunked body: counted as it streams in

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit[0]:
                    raise self._error(f"more than {received}", limit)
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Count requests by route template, method, model and status class; time them.

    The route template (``/v1/models/{name}/predict``), not the raw path, keeps label
    cardinality bounded; the model label is set only for models the service knows.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        known_models: Callable[[], Collection[str]],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.known_models = known_models
        # (route, method, model, status class) -> its request counter's ``inc`` and duration
        # histogram's ``observe``: label children looked up once, not per request.
        self._children: dict[
            tuple[str, str, str, int], tuple[Callable[[], None], Callable[[float], None]]
        ] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            name = (scope.get("path_params") or {}).get("name", "")
            model = name if name and name in self.known_models() else ""
            method = scope.get("method", "")
            key = (template, method, model, status // 100)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    self.metrics.requests.labels(
                        route=template, method=method, model=model, status=f"{status // 100}xx"
                    ).inc,
                    self.metrics.request_seconds.labels(route=template, method=method).observe,
                )
            children[0]()
            children[1](time.perf_counter() - start)
