"""Direct dispatch of predict and infer (service.server.dispatch): FastAPI's answers, shorter."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app
from service.server.dispatch import DirectRoutes, ServiceApp, no_arguments
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import image_bytes, make_settings

# One corpus of predict and infer requests, answers and errors alike, sent both ways.
MAX_BODY_BYTES = 64 * 1024  # both apps' max_body_bytes
X = reference_inputs(2)
RAW = {"content": X.tobytes(), "headers": {"Content-Type": "application/octet-stream"}}
V2_INPUT = {"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}
V2 = {"json": {"inputs": [V2_INPUT]}}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "raw tensor": ("/v1/models/tiny/predict?shape=2,1,8,8&top_k=3", RAW),
    "raw tensor, statistics": ("/v1/models/tiny/predict?shape=2,1,8,8&stats=channels", RAW),
    "version": ("/v1/models/tiny/versions/1/predict?shape=2,1,8,8", RAW),
    "base64 json": (
        "/v1/models/tiny/predict",
        {"json": {"tensor": {"shape": [2, 1, 8, 8], "data": base64.b64encode(RAW["content"])}}},
    ),
    "image upload": ("/v1/models/tiny/predict", {"files": {"file": ("a.png", image_bytes())}}),
    "v2 infer": ("/v2/models/tiny/infer", V2),
    "v2 infer, version": ("/v2/models/tiny/versions/2/infer", V2),
    # errors: every one answered by the same handler, with the same body
    "unknown model": ("/v1/models/nope/predict?shape=2,1,8,8", RAW),
    "unknown version": ("/v2/models/tiny/versions/9/infer", V2),
    "bad query": ("/v1/models/tiny/predict?top_k=zero", RAW),
    "top_k under 1": ("/v1/models/tiny/predict?shape=2,1,8,8&top_k=0", RAW),
    "empty top_k": ("/v1/models/tiny/predict?shape=2,1,8,8&top_k=", RAW),
    "two bad parameters": ("/v1/models/tiny/predict?shape=2,1,8,8&top_k=-1&stats=all", RAW),
    "repeated parameter": ("/v1/models/tiny/predict?shape=2,1,8,8&top_k=1&top_k=2", RAW),
    "unknown parameter": ("/v1/models/tiny/predict?shape=2,1,8,8&colour=red", RAW),
    "query statistics on images": (
        "/v1/models/tiny/predict?stats=summary&top_k=2",
        {"files": {"file": ("a.png", image_bytes())}},
    ),
    "wrong shape": ("/v1/models/tiny/predict?shape=1,1,8,16", RAW),
    "no shape": ("/v1/models/tiny/predict", RAW),
    "media type": (
        "/v1/models/tiny/predict",
        {"content": b"x", "headers": {"Content-Type": "text/plain"}},
    ),
    "not an image": ("/v1/models/tiny/predict", {"files": {"file": ("a.png", b"not a png")}}),
    "malformed v2": ("/v2/models/tiny/infer", {"json": {"inputs": "no"}}),
    "body too large": (
        "/v1/models/tiny/predict?shape=1,1,8,8",
        {
            "content": bytes(MAX_BODY_BYTES + 6 * 1024),
            "headers": {"Content-Type": "application/octet-stream"},
        },
    ),
}


def send(client: TestClient, case: str) -> Any:
    """POST one case of the corpus with ``client``."""
    path, kwargs = CASES[case]
    if "json" in kwargs and "tensor" in kwargs["json"]:
        tensor = kwargs["json"]["tensor"]
        kwargs = {"json": {"tensor": {**tensor, "data": tensor["data"].decode()}}}
    return client.post(path, **kwargs)


class HandledError(Exception):
    """An error the app has a handler for."""


async def endpoint(request: Request, what: str) -> Response:
    if what == "fail":
        raise HandledError("handled")
    if what == "bug":
        raise RuntimeError("a bug")
    return JSONResponse({"what": what, "body": (await request.body()).decode()})


async def failure_handler(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=418)


async def bug_handler(request: Request, exc: Exception) -> Response:
    logging.getLogger("bugs").error("bug in %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal"}, status_code=500)


class Tag:
    """Middleware that appends its name to an ``x-tags`` response header."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message["headers"])
                tags = headers.get(b"x-tags", b"")
                headers[b"x-tags"] = tags + (b"," if tags else b"") + self.name.encode()
                message = {**message, "headers": list(headers.items())}
            await send(message)

        await self.app(scope, receive, tagged)


@pytest.fixture
def small_app() -> ServiceApp:
    """An app whose router knows no route at all: only the direct dispatch can answer."""
    app = ServiceApp(exception_handlers={HandledError: failure_handler, Exception: bug_handler})
    route = APIRoute("/things/{what}", endpoint, methods=["POST"])
    middleware = [Middleware(Tag, name="outer"), Middleware(Tag, name="inner")]
    app.direct = DirectRoutes([route], {endpoint: no_arguments}, app.exception_handlers, middleware)
    return app


def test_a_direct_route_is_answered_without_the_router(small_app: ServiceApp) -> None:
    client = TestClient(small_app)
    response = client.post("/things/spoon", content=b"hello")
    assert response.status_code == 200
    assert response.json() == {"what": "spoon", "body": "hello"}
    # The middleware runs in the listed order, the first outermost (it tags last).
    assert response.headers["x-tags"] == "inner,outer"
    # Other methods and paths go to FastAPI, which has no such route.
    assert client.get("/things/spoon").status_code == 404
    assert client.post("/things/spoon/more").status_code == 404


def test_errors_go_through_the_apps_handlers(
    small_app: ServiceApp, caplog: pytest.LogCaptureFixture
) -> None:
    client = TestClient(small_app, raise_server_exceptions=False)
    handled = client.post("/things/fail")
    assert (handled.status_code, handled.json()) == (418, {"error": "handled"})
    with caplog.at_level(logging.ERROR):
        bug = client.post("/things/bug")
    assert (bug.status_code, bug.json()) == (500, {"error": "internal"})
    # The app's handler logs it with its traceback, once: the dispatch adds no second one.
    assert [r.name for r in caplog.records] == ["bugs"]
    assert "a bug" in caplog.text
    assert client.post("/things/fine").status_code == 200  # and it keeps serving


def test_only_post_endpoints_can_be_direct() -> None:
    with pytest.raises(ValueError, match="a direct route is a POST"):
        DirectRoutes([APIRoute("/x", endpoint, methods=["GET"])], {endpoint: no_arguments}, {})


# ---------------------------------------------------------------- the service's direct routes


@pytest.fixture(scope="module")
def clients(model_repo: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """The service as built, and the same service with the direct dispatch switched off."""
    settings = make_settings(model_repo, max_body_bytes=MAX_BODY_BYTES)
    hot_app = create_app(settings)
    plain_app = create_app(settings.model_copy(update={"direct_dispatch": False}))
    assert isinstance(hot_app, ServiceApp)
    assert hot_app.direct is not None
    assert plain_app.direct is None
    with TestClient(hot_app) as hot, TestClient(plain_app) as plain:
        yield hot, plain


@pytest.mark.parametrize("case", CASES)
def test_the_hot_path_answers_as_fastapi_does(
    clients: tuple[TestClient, TestClient], case: str
) -> None:
    hot, plain = (send(client, case) for client in clients)
    assert hot.status_code == plain.status_code
    assert hot.headers == plain.headers  # all of them, content-length included
    assert hot.content == plain.content
    if case in ("raw tensor", "v2 infer", "repeated parameter", "query statistics on images"):
        assert hot.status_code == 200
    if case in ("unknown model", "bad query", "media type", "body too large"):
        assert 400 <= hot.status_code < 500
    if "top_k" in case or "parameters" in case or case == "bad query":
        assert hot.status_code == 422
        assert "query parameter top_k" in hot.json()["error"]["message"]


def test_hot_requests_are_counted_under_their_route(
    clients: tuple[TestClient, TestClient],
) -> None:
    hot, _ = clients
    before = _count(hot, "/v1/models/{name}/predict", "tiny", "2xx")
    send(hot, "raw tensor")
    hot.post("/v1/models/nope/predict?shape=2,1,8,8", **RAW)  # an unknown model: no label
    assert _count(hot, "/v1/models/{name}/predict", "tiny", "2xx") == before + 1
    assert _count(hot, "/v1/models/{name}/predict", "", "4xx") >= 1


def _count(client: TestClient, route: str, model: str, status: str) -> float:
    wanted = f'method="POST",model="{model}",route="{route}",status="{status}"'
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("relu_serve_http_requests_total{") and wanted in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
