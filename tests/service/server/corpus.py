"""One corpus of predict and infer requests, answers and errors alike, for the tests that
send it through the service's shortcuts and through the stock path and compare the answers
(service/server/dispatch.py: the direct dispatch against FastAPI's router)."""

from __future__ import annotations

import base64
from typing import Any, Protocol

from tests.service.conftest import reference_inputs
from tests.service.http_helpers import image_bytes

MAX_BODY_BYTES = 64 * 1024  # the servers under comparison take this as max_body_bytes


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


class Poster(Protocol):
    def post(self, url: str, **kwargs: Any) -> Any: ...


def send(client: Poster, case: str) -> Any:
    """POST one case of the corpus with ``client`` (TestClient or httpx.Client)."""
    path, kwargs = CASES[case]
    if "json" in kwargs and "tensor" in kwargs["json"]:
        tensor = kwargs["json"]["tensor"]
        kwargs = {"json": {"tensor": {**tensor, "data": tensor["data"].decode()}}}
    return client.post(path, **kwargs)
