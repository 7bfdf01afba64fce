"""Direct dispatch: predict and v2 infer go straight to their endpoints, past FastAPI's router.

Under load, uvicorn alone costs ~25 us of CPU per request here, a FastAPI no-op endpoint
~85 us: the rest is Starlette's and FastAPI's per-request machinery (their middleware stack,
the route search over every route, the per-route exception, exit-stack and request/response
layers). Serving the default model, that machinery took more of the event loop's time than
the predict itself (py-spy). ``ServiceApp`` is FastAPI with one addition: a POST that one of
the ``DirectRoutes`` matches skips all of that and goes to the route's endpoint through only
the service's own middleware (metrics, body limit), with what the router would have put in
the scope (``path_params``, ``route``, ``endpoint``) and the app's own exception handlers
for the errors it raises. The endpoints, their checks and their error answers are the same
objects as on FastAPI's path; only the way in is shorter. Every other request, and any under
a root path, goes through FastAPI as usual.

This is a shortcut around a framework, kept because ``bench/bench_ab.py`` measures it worth
2.3x the requests per second of FastAPI's own path (default model, 64 clients,
docs/benchmarks.md); ``RELU_SERVE_DIRECT_DISPATCH=false`` switches it off, and
tests/service/server/test_dispatch.py sends one corpus of requests both ways and compares the
answers. It uses Starlette's ``compile_path`` (as its routes do), ``Middleware``'s
``cls``/``args``/``kwargs`` and pydantic validation of the query model, no private names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

# An exception handler as Starlette keeps them (the service's are all coroutines).
Handler = Callable[[Request, Any], Any]
# The keyword arguments an endpoint takes beside the request and its path parameters, read
# from the request the way FastAPI would (for example ``query_model``).
Arguments = Callable[[Request], Mapping[str, Any]]


def no_arguments(request: Request) -> Mapping[str, Any]:
    """For endpoints that take only the request."""
    return {}


def query_model(param: str, model: type[BaseModel]) -> Arguments:
    """The argument ``param``, a pydantic model of the query string, validated as FastAPI's
    ``Annotated[model, Query()]`` does: the same model, and its errors under ``("query", ...)``
    as a RequestValidationError (422 through the app's handler)."""

    # No query string (most requests): the defaults, as FastAPI's validation of {} gives them.
    defaults = {param: model.model_validate({})}

    def arguments(request: Request) -> Mapping[str, Any]:
        if not request.scope["query_string"]:
            return defaults
        try:
            return {param: model.model_validate(dict(request.query_params))}
        except ValidationError as exc:
            errors = [
                {**error, "loc": ("query", *error["loc"])}
                for error in exc.errors(include_url=False)
            ]
            raise RequestValidationError(errors) from None

    return arguments


class DirectRoutes:
    """Match POSTs to those of ``routes`` whose endpoint ``endpoints`` names (endpoint -> how
    to read its arguments), run them under ``middleware``, answer their exceptions with
    ``handlers``."""

    def __init__(
        self,
        routes: Iterable[BaseRoute],
        endpoints: Mapping[Callable[..., Any], Arguments],
        handlers: Mapping[Any, Handler],
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.routes = [r for r in routes if isinstance(r, APIRoute) and r.endpoint in endpoints]
        for route in self.routes:
            if route.methods != {"POST"}:
                raise ValueError(f"{route.path}: a direct route is a POST")
        # Each path compiled as Starlette compiles it: Route.matches does the same and more
        # (root paths, the route context FastAPI adds), ~15 us per request for two routes.
        self._patterns = [(compile_path(r.path), r) for r in self.routes]
        self.endpoints = dict(endpoints)
        self.handlers = dict(handlers)
        app: ASGIApp = self._endpoint
        for item in reversed(middleware):  # the first listed runs first, as in Starlette
            app = item.cls(app, *item.args, **item.kwargs)
        self.app = app

    def match(self, scope: Scope) -> bool:
        """Whether a direct route takes this request; if so, its scope gets what the router
        would set (route, endpoint, path parameters)."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return False  # under a root path: FastAPI's router strips it
        path = scope["path"]
        for (regex, _, convertors), route in self._patterns:
            found = regex.match(path)
            if found is not None:
                params = found.groupdict()
                scope["path_params"] = {k: convertors[k].convert(v) for k, v in params.items()}
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                return True
        return False

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            handler: Handler | None = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            endpoint: Callable[..., Awaitable[Response]] = scope["endpoint"]
            arguments = self.endpoints[endpoint](request)
            response = await endpoint(request, **scope["path_params"], **arguments)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)  # a bug's handler logs its traceback
        await response(scope, receive, send)


class ServiceApp(FastAPI):
    """FastAPI, plus ``direct``: requests it matches skip FastAPI's machinery (module
    docstring)."""

    direct: DirectRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = self.direct
        if direct is not None and direct.match(scope):
            scope["app"] = self
            await direct.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
