"""Bad requests: each gets a 4xx JSON error naming the problem, and the service keeps serving."""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.v2_codec import HEADER_LENGTH
from service.app import create_app
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import error_of, image_bytes, make_settings

PREDICT = "/v1/models/tiny/predict"
INFER = "/v2/models/tiny/infer"
MAX_BODY = 64 * 1024
MAX_PIXELS = 100 * 100
MAX_BATCH = 4


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    settings = make_settings(
        model_repo, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS, max_batch_size=MAX_BATCH
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def b64(x: np.ndarray) -> str:
    return base64.b64encode(x.tobytes()).decode()


def tensor_json(x: np.ndarray, shape: list[int] | None = None) -> dict[str, Any]:
    return {"tensor": {"shape": list(x.shape) if shape is None else shape, "data": b64(x)}}


def truncated_png() -> bytes:
    data = image_bytes("PNG", (64, 64), "RGB")
    return data[: len(data) // 2]


def big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (200, 150)).save(buffer, format="PNG")  # 30000 px, tiny file
    return buffer.getvalue()


Request = Callable[[TestClient], Any]

# (id, request, expected status, expected error code, words the message must contain)
V1_CASES: list[tuple[str, Request, int, str, tuple[str, ...]]] = [
    (
        "not-an-image",
        lambda c: c.post(PREDICT, files={"file": ("a.png", b"this is not an image at all")}),
        415,
        "unsupported_image_format",
        ("a.png", "not a supported image", "PNG"),
    ),
    (
        "truncated-png",
        lambda c: c.post(PREDICT, files={"file": ("cut.png", truncated_png())}),
        400,
        "invalid_image",
        ("cut.png", "truncated or corrupt PNG"),
    ),
    (
        "bad-base64",
        lambda c: c.post(PREDICT, json={"images": ["%%%not base64%%%"]}),
        400,
        "bad_request",
        ("images[0]", "base64"),
    ),
    (
        "unsupported-media-type",
        lambda c: c.post(PREDICT, content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
        ("text/plain", "multipart/form-data"),
    ),
    (
        "no-content-type",
        lambda c: c.post(PREDICT, content=b"hello"),
        415,
        "unsupported_media_type",
        ("'none'",),
    ),
    (
        "multipart-without-file",
        lambda c: c.post(PREDICT, data={"top_k": "3"}, files={"other": ("a.png", image_bytes())}),
        400,
        "bad_request",
        ("'file'", "'files'"),
    ),
    (
        "invalid-json",
        lambda c: c.post(PREDICT, content=b"{nope", headers={"Content-Type": "application/json"}),
        400,
        "bad_request",
        ("not valid JSON",),
    ),
    (
        "json-without-images-or-tensor",
        lambda c: c.post(PREDICT, json={"pictures": []}),
        400,
        "bad_request",
        ('"images"', '"tensor"'),
    ),
    (
        "tensor-wrong-shape",
        lambda c: c.post(PREDICT, json=tensor_json(np.zeros((1, 1, 9, 9), np.float32))),
        400,
        "invalid_input",
        ("shape",),
    ),
    (
        "tensor-wrong-channels",
        lambda c: c.post(PREDICT, json=tensor_json(np.zeros((1, 3, 8, 8), np.float32))),
        400,
        "invalid_input",
        ("shape",),
    ),
    (
        "tensor-wrong-rank",
        lambda c: c.post(PREDICT, json=tensor_json(np.zeros((1, 64), np.float32))),
        400,
        "invalid_input",
        ("rank",),
    ),
    (
        "tensor-wrong-dtype",
        lambda c: c.post(PREDICT, json={"tensor": {"data": [[1]], "dtype": "int64"}}),
        400,
        "bad_request",
        ("dtype", "'int64'", "float32"),
    ),
    (
        "tensor-bytes-do-not-fit-shape",
        lambda c: c.post(
            PREDICT, json=tensor_json(np.zeros((1, 1, 8, 8), np.float32), shape=[1, 1, 8, 9])
        ),
        400,
        "bad_request",
        ("256 bytes", "[1, 1, 8, 9]"),
    ),
    (
        "tensor-as-nested-lists",  # issue 16: the message shows where the lists go
        lambda c: c.post(PREDICT, json={"tensor": [[[[0.0] * 8] * 8]]}),
        400,
        "bad_request",
        ('"data": [[...]]', '{"tensor": {"shape": [...]'),
    ),
    (
        "ragged-nested-lists",
        lambda c: c.post(PREDICT, json={"tensor": {"data": [[1.0, 2.0], [3.0]]}}),
        400,
        "bad_request",
        ("nested lists",),
    ),
    (
        "nan-values",
        lambda c: c.post(PREDICT, json=tensor_json(np.full((1, 1, 8, 8), np.nan, np.float32))),
        400,
        "invalid_input",
        ("finite",),
    ),
    (
        "infinite-values",
        lambda c: c.post(PREDICT, json=tensor_json(np.full((1, 1, 8, 8), np.inf, np.float32))),
        400,
        "invalid_input",
        ("finite",),
    ),
    (
        "empty-batch",
        lambda c: c.post(PREDICT, json=tensor_json(np.zeros((0, 1, 8, 8), np.float32))),
        400,
        "invalid_input",
        ("batch size 0",),
    ),
    (
        "empty-image-list",
        lambda c: c.post(PREDICT, json={"images": []}),
        400,
        "invalid_input",
        ("no images", "batch size 0"),
    ),
    (
        "octet-stream-without-shape",
        lambda c: c.post(
            PREDICT,
            content=np.zeros(64, np.float32).tobytes(),
            headers={"Content-Type": "application/octet-stream"},
        ),
        400,
        "bad_request",
        ("X-Tensor-Shape",),
    ),
    (
        "shape-header-of-65-dimensions",
        lambda c: c.post(
            PREDICT,
            content=np.zeros(1, np.float32).tobytes(),
            headers={"Content-Type": "application/octet-stream", "X-Tensor-Shape": "1," * 65},
        ),
        400,
        "bad_request",
        ("65 dimensions", "at most 32"),
    ),
    (
        "shape-of-65-dimensions",
        lambda c: c.post(PREDICT, json={"tensor": {"shape": [1] * 65, "data": [0.0]}}),
        400,
        "bad_request",
        ("65 dimensions", "at most 32"),
    ),
    (
        "shape-of-huge-dimensions-base64",
        lambda c: c.post(PREDICT, json={"tensor": {"shape": [2**32, 2**32, 1, 1], "data": ""}}),
        400,
        "bad_request",
        ("more than 4294967296 elements",),
    ),
    (
        "shape-of-huge-dimensions-lists",
        lambda c: c.post(PREDICT, json={"tensor": {"shape": [2**32, 2**32, 1, 1], "data": []}}),
        400,
        "bad_request",
        ("more than 4294967296 elements",),
    ),
    (  # found by the fuzz run: no elements, but more than numpy can index
        "empty-shape-of-huge-dimensions-lists",
        lambda c: c.post(PREDICT, json={"tensor": {"shape": [0, 2**31, 2**31], "data": []}}),
        400,
        "bad_request",
        ("more than 4294967296 elements",),
    ),
    (
        "empty-shape-of-huge-dimensions-base64",
        lambda c: c.post(PREDICT, json={"tensor": {"shape": [2**31, 0, 2**31], "data": ""}}),
        400,
        "bad_request",
        ("more than 4294967296 elements",),
    ),
    (
        "long-shape-header-not-echoed-whole",
        lambda c: c.post(
            PREDICT,
            content=np.zeros(64, np.float32).tobytes(),
            headers={
                "Content-Type": "application/octet-stream",
                "X-Tensor-Shape": "1,1,8," + " " * 100_000 + "y",
            },
        ),
        400,
        "bad_request",
        ("characters",),
    ),
    (
        "batch-over-the-limit-tensor",
        lambda c: c.post(PREDICT, json=tensor_json(reference_inputs(MAX_BATCH + 1))),
        413,
        "batch_too_large",
        (f"{MAX_BATCH + 1}", "max_batch_size"),
    ),
    (
        "batch-over-the-limit-files",
        lambda c: c.post(
            PREDICT,
            files=[("file", (f"{i}.png", image_bytes())) for i in range(MAX_BATCH + 1)],
        ),
        413,
        "batch_too_large",
        ("max_batch_size",),
    ),
    (
        "batch-over-the-limit-base64",
        lambda c: c.post(
            PREDICT,
            json={"images": [base64.b64encode(image_bytes()).decode()] * (MAX_BATCH + 1)},
        ),
        413,
        "batch_too_large",
        ("max_batch_size",),
    ),
    (
        "image-over-the-pixel-limit",
        lambda c: c.post(PREDICT, files={"file": ("big.png", big_png())}),
        413,
        "image_too_large",
        ("big.png", "200x150", f"{MAX_PIXELS} pixels"),
    ),
    (
        "body-over-the-size-limit",
        lambda c: c.post(
            PREDICT,
            content=b"\0" * (MAX_BODY + 1),
            headers={"Content-Type": "application/octet-stream"},
        ),
        413,
        "body_too_large",
        (f"{MAX_BODY}", "max_body_bytes"),
    ),
    (
        "chunked-body-over-the-size-limit",
        lambda c: c.post(
            PREDICT,
            content=iter([b"\0" * (MAX_BODY // 2)] * 3),
            headers={"Content-Type": "application/octet-stream"},
        ),
        413,
        "body_too_large",
        ("max_body_bytes",),
    ),
    (
        "unknown-model",
        lambda c: c.post("/v1/models/nope/predict", files={"file": ("a.png", image_bytes())}),
        404,
        "model_not_found",
        ("nope",),
    ),
    (
        "unknown-version",
        lambda c: c.post(
            "/v1/models/tiny/versions/7/predict", files={"file": ("a", image_bytes())}
        ),
        404,
        "model_not_found",
        ("tiny", "7"),
    ),
    (
        "unknown-model-metadata",
        lambda c: c.get("/v1/models/nope"),
        404,
        "model_not_found",
        ("nope",),
    ),
    (
        "unknown-model-activations",
        lambda c: c.get("/v1/models/nope/activations"),
        404,
        "model_not_found",
        ("nope",),
    ),
    (
        "top-k-not-a-number",
        lambda c: c.post(PREDICT, params={"top_k": "many"}, files={"file": ("a", image_bytes())}),
        422,
        "validation_error",
        ("top_k", "'many'"),
    ),
    (
        "top-k-zero",
        lambda c: c.post(PREDICT, params={"top_k": 0}, files={"file": ("a", image_bytes())}),
        422,
        "validation_error",
        ("top_k",),
    ),
    (
        "stats-unknown-level",
        lambda c: c.post(PREDICT, params={"stats": "all"}, files={"file": ("a", image_bytes())}),
        422,
        "validation_error",
        ("stats", "'all'"),
    ),
    (
        "top-k-in-json-body",
        lambda c: c.post(PREDICT, json={"images": [], "top_k": -2}),
        400,
        "bad_request",
        ("top_k", "-2"),
    ),
    (
        "unknown-route",
        lambda c: c.get("/v1/nothing/here"),
        404,
        "not_found",
        ("/v1/nothing/here",),
    ),
    (
        "wrong-method",
        lambda c: c.get(PREDICT),
        405,
        "method_not_allowed",
        ("GET",),
    ),
]


def v2_body(**overrides: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    tensor.update(overrides)
    return {"inputs": [tensor]}


V2_CASES: list[tuple[str, Request, int, tuple[str, ...]]] = [
    (
        "not-json",
        lambda c: c.post(INFER, content=b"\x00\x01binary"),
        400,
        ("not valid JSON",),
    ),
    ("no-inputs", lambda c: c.post(INFER, json={"outputs": []}), 400, ("'inputs'",)),
    (
        "shape-of-65-dimensions",
        lambda c: c.post(
            INFER,
            json={
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1] * 65, "data": [0]}]
            },
        ),
        400,
        ("65 dimensions", "at most 32"),
    ),
    (
        "shape-of-huge-dimensions",
        lambda c: c.post(
            INFER,
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [2**32, 2**32, 1, 1], "data": []}
                ]
            },
        ),
        400,
        ("more than 4294967296 elements",),
    ),
    (
        "empty-shape-of-huge-dimensions",
        lambda c: c.post(
            INFER,
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [0, 2**40, 8], "data": []}
                ]
            },
        ),
        400,
        ("more than 4294967296 elements",),
    ),
    ("inputs-not-a-list", lambda c: c.post(INFER, json={"inputs": {}}), 400, ("'inputs'",)),
    (
        "wrong-datatype",
        lambda c: c.post(INFER, json=v2_body(datatype="INT64")),
        400,
        ("INT64", "FP32"),
    ),
    (
        "wrong-input-name",
        lambda c: c.post(INFER, json=v2_body(name="pixels")),
        400,
        ("'input'", "pixels"),
    ),
    (
        "data-does-not-fit-shape",
        lambda c: c.post(INFER, json=v2_body(data=[0.0] * 10)),
        400,
        ("10 elements", "64"),
    ),
    (
        "negative-shape",
        lambda c: c.post(INFER, json=v2_body(shape=[-1, 1, 8, 8])),
        400,
        ("shape",),
    ),
    (
        "wrong-model-shape",
        lambda c: c.post(INFER, json=v2_body(shape=[1, 64], data=[0.0] * 64)),
        400,
        ("rank",),
    ),
    (
        "strings-as-data",
        lambda c: c.post(INFER, json=v2_body(data=["a"] * 64)),
        400,
        ("list of numbers",),
    ),
    (
        "unknown-output",
        lambda c: c.post(INFER, json={**v2_body(), "outputs": [{"name": "softmax"}]}),
        400,
        ("'softmax'", "probabilities"),
    ),
    (
        "classification-extension",
        lambda c: c.post(
            INFER,
            json={
                **v2_body(),
                "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
            },
        ),
        400,
        ("classification",),
    ),
    (
        "binary-size-mismatch",
        lambda c: c.post(
            INFER,
            content=_binary_request(declared=100, sent=256),
            headers={HEADER_LENGTH: str(_binary_header_length(100))},
        ),
        400,
        ("binary_data_size",),
    ),
    (
        "header-length-past-the-body",
        lambda c: c.post(INFER, content=b"{}", headers={HEADER_LENGTH: "999"}),
        400,
        (HEADER_LENGTH,),
    ),
    (
        "non-finite-binary-data",
        lambda c: c.post(
            INFER,
            content=_binary_request(256, 256, fill=np.nan),
            headers={HEADER_LENGTH: str(_binary_header_length(256))},
        ),
        400,
        ("finite",),
    ),
    ("unknown-model", lambda c: c.post("/v2/models/nope/infer", json=v2_body()), 404, ("nope",)),
    (
        "unknown-version",
        lambda c: c.post("/v2/models/tiny/versions/9/infer", json=v2_body()),
        404,
        ("9",),
    ),
    ("unknown-model-metadata", lambda c: c.get("/v2/models/nope"), 404, ("nope",)),
    (
        "body-over-the-size-limit",
        lambda c: c.post(INFER, content=b" " * (MAX_BODY + 10)),
        413,
        ("max_body_bytes",),
    ),
    (
        "gzip-bomb",
        lambda c: c.post(INFER, content=_gzip_bomb(), headers={"Content-Encoding": "gzip"}),
        413,
        ("max_body_bytes",),
    ),
]


def _binary_header(declared: int) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )


def _binary_header_length(declared: int) -> int:
    return len(_binary_header(declared))


def _binary_request(declared: int, sent: int, fill: float = 0.0) -> bytes:
    return _binary_header(declared) + np.full(sent // 4, fill, np.float32).tobytes()


def _gzip_bomb() -> bytes:
    import gzip

    return gzip.compress(b" " * (MAX_BODY * 4))


def assert_still_serving(client: TestClient) -> None:
    """A good request right after a bad one is answered normally."""
    response = client.post(PREDICT, files={"file": ("ok.png", image_bytes())})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["top_k"]) == 5


@pytest.mark.parametrize(
    ("send", "status", "code", "words"),
    [case[1:] for case in V1_CASES],
    ids=[case[0] for case in V1_CASES],
)
def test_v1_bad_request_is_a_json_4xx_naming_the_problem(
    client: TestClient, send: Request, status: int, code: str, words: tuple[str, ...]
) -> None:
    response = send(client)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = error_of(response)
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("send", "status", "words"),
    [case[1:] for case in V2_CASES],
    ids=[case[0] for case in V2_CASES],
)
def test_v2_bad_request_follows_the_protocol(
    client: TestClient, send: Request, status: int, words: tuple[str, ...]
) -> None:
    response = send(client)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], (word, body["error"])
    assert_still_serving(client)


def test_unexpected_errors_are_a_logged_generic_500(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(model_repo))
    with TestClient(app, raise_server_exceptions=False) as client:

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

        model = app.state.plane.get_model("tiny")
        monkeypatch.setattr(model, "run_batch", broken)  # a bug in the model run
        with caplog.at_level(logging.ERROR, logger="service"):
            v1 = client.post(PREDICT, files={"file": ("a.png", image_bytes())})
            v2 = client.post(INFER, json=v2_body())
    assert v1.status_code == 500
    assert error_of(v1) == {"code": "internal_error", "message": "internal server error"}
    assert v2.status_code == 500
    assert v2.json() == {"error": "internal server error"}
    assert "secret internal detail" not in v1.text + v2.text
    logged = [r for r in caplog.records if r.exc_info]
    assert logged
    assert "secret internal detail" in str(logged[0].exc_info[1])


def slow_down(model: Any, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.3) -> Any:
    """Make every run of ``model`` take ``seconds`` longer; returns the undo."""
    real_run = model.run_batch  # what the batcher's thread calls

    def slow_run(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(model, "run_batch", slow_run)
    return lambda: monkeypatch.setattr(model, "run_batch", real_run)


def test_inference_over_the_time_limit_is_503(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow run in the inference thread (the tiny model's runs would otherwise be inline).
    settings = make_settings(model_repo, request_timeout_s=0.05, inline_small_models=False)
    app = create_app(settings)
    with TestClient(app) as client:
        restore = slow_down(app.state.plane.get_model("tiny"), monkeypatch)
        v1 = client.post(PREDICT, files={"file": ("a.png", image_bytes())})
        v2 = client.post(INFER, json=v2_body())
        restore()
        time.sleep(0.7)  # the abandoned runs still hold the worker (a thread cannot be killed)
        after = client.post(PREDICT, files={"file": ("a.png", image_bytes())})
    assert v1.status_code == 503
    error = error_of(v1)
    assert error["code"] == "timeout"
    assert "request_timeout_s" in error["message"]
    assert v2.status_code == 503
    assert "request_timeout_s" in v2.json()["error"]
    assert after.status_code == 200


def test_queue_over_the_limit_is_503_with_retry_after(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(model_repo, max_queue_length=1, inline_small_models=False))
    with TestClient(app) as client:
        restore = slow_down(app.state.plane.get_model("tiny"), monkeypatch)
        body = tensor_json(reference_inputs(1))
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda _: client.post(PREDICT, json=body), range(3)))
        restore()
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200
        assert statuses[-1] == 503
        shed = next(r for r in responses if r.status_code == 503)
        assert shed.headers["Retry-After"] == "1"
        error = error_of(shed)
        assert error["code"] == "queue_full"
        assert "max_queue_length" in error["message"]
        assert_still_serving(client)
