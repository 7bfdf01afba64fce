"""A direct dispatch for the few routes that carry the traffic (predict, v2 infer).

Starlette's router tries the app's routes one by one, and FastAPI wraps each endpoint in
layers (exception middleware, an exit stack, request/response adapters). Serving the default
model under load, that machinery took about half of the event loop's time per request
(py-spy), more than the predict itself. ``HotRoutes`` sits just outside the router: a POST
whose path one of the hot routes matches goes straight to that route's endpoint, with what
the router would have set in the scope (``path_params``, ``route``, ``endpoint``) and the app's
own exception handlers for the errors it raises. The endpoints, their checks and their error
answers are the same objects as on the normal path; only the dispatch is shorter. Every other
request, and any endpoint that needs FastAPI's dependency injection, goes down the normal stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    """Dispatch POSTs to ``routes`` (endpoints taking only the request) directly."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Iterable[APIRoute],
        handlers: Mapping[Any, Handler],
    ) -> None:
        self.app = app
        self.routes = list(routes)
        for route in self.routes:
            if route.methods != {"POST"} or route.dependant.dependencies:
                raise ValueError(f"{route.path}: a hot route is a POST taking only the request")
        # Exception class -> handler, as Starlette's ExceptionMiddleware looks them up; the
        # catch-all ``Exception`` handler stays with ServerErrorMiddleware (a 500).
        self._handlers = {
            cls: h for cls, h in handlers.items() if isinstance(cls, type) and cls is not Exception
        }

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for route in self.routes:
                match = route.path_regex.match(path)
                if match is not None:
                    params = {
                        key: route.param_convertors[key].convert(value)
                        for key, value in match.groupdict().items()
                    }
                    await self._dispatch(route, params, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _dispatch(
        self, route: APIRoute, params: dict[str, Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["path_params"] = params
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)
