"""A short way in for the few routes that carry the traffic (predict, v2 infer).

Under load, uvicorn alone costs ~25 us of CPU per request here, a FastAPI no-op endpoint
~85 us: the rest is Starlette's and FastAPI's per-request machinery (their middleware stack,
the route search over every route, the per-route exception, exit-stack and request/response
layers). Serving the default model, that machinery took more of the event loop's time than
the predict itself (py-spy). ``ServiceApp`` is FastAPI with one addition: a request that one
of the ``HotRoutes`` matches skips all of that and goes to the route's endpoint through only
the service's own middleware (metrics, body limit), with what the router would have put in
the scope (``app``, ``path_params``, ``route``, ``endpoint``) and the app's own exception
handlers for the errors it raises. The endpoints, their checks and their error answers are
the same objects as on the normal path; only the way in is shorter. Every other request goes
through FastAPI as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    """Match POSTs to ``routes`` (endpoints taking only the request) and run them under
    ``middleware``, answering their exceptions with ``handlers``."""

    def __init__(
        self,
        routes: Iterable[APIRoute],
        handlers: Mapping[Any, Handler],
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.routes = list(routes)
        for route in self.routes:
            if route.methods != {"POST"} or route.dependant.dependencies:
                raise ValueError(f"{route.path}: a hot route is a POST taking only the request")
        self.handlers = dict(handlers)
        app: ASGIApp = self._endpoint
        for item in reversed(middleware):  # the first listed runs first, as in Starlette
            cls, args, kwargs = item
            app = cls(app, *args, **kwargs)
        self.app = app

    def match(self, scope: Scope) -> bool:
        """Whether a hot route takes this request; if so, its scope gets the route and the
        path parameters, as the router would set them."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        path = scope["path"]
        for route in self.routes:
            found = route.path_regex.match(path)
            if found is not None:
                scope["path_params"] = {
                    key: route.param_convertors[key].convert(value)
                    for key, value in found.groupdict().items()
                }
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                return True
        return False

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await scope["endpoint"](request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            if handler is self.handlers.get(Exception):  # a bug: log it as the server would
                log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            response = await handler(request, exc)
        await response(scope, receive, send)


async def read_body(request: Request) -> bytes:
    """The whole request body, as ``Request.body()`` gives it, without its async generator
    (~2 us per request on the hot routes); later ``body()`` calls get the same bytes."""
    if hasattr(request, "_body"):  # read already
        return request._body
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # where Request.body() keeps what it read
    return body


class ServiceApp(FastAPI):
    """FastAPI, plus ``hot``: requests it matches skip FastAPI's machinery (module docstring)."""

    hot: HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot
        if hot is not None and hot.match(scope):
            scope["app"] = self
            await hot.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
