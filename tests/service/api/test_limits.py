"""Limits against hostile input, beyond ``test_errors.py``: real decompression bombs at the
default pixel limit, and the body, queue and time limits over a real socket.

Each limit answers with its status and a JSON error that names the setting.
"""

from __future__ import annotations

import base64
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_onnx_cnn, save_model
from tests.service.core.test_swap import running_server
from tests.service.http_helpers import error_of, make_settings

PREDICT = "/v1/models/tiny/predict"


def png(width: int, height: int, idat: bytes) -> bytes:
    """A grayscale 8-bit PNG with this header and image data (CRCs correct)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def lying_png() -> bytes:
    """~70 bytes that declare 60,000 x 60,000 pixels (3.6 GB decoded)."""
    return png(60_000, 60_000, zlib.compress(b"\x00" * 1024))


def real_bomb() -> bytes:
    """A complete, valid 10,000 x 10,000 PNG of zeros: ~100 KB that decode to 100 MB."""
    row = b"\x00" * 10_001  # filter byte + pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(10_000)) + compressor.flush()
    return png(10_000, 10_000, data)


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    """The default limits (max_image_pixels 4096 x 4096)."""
    with TestClient(create_app(make_settings(model_repo))) as test_client:
        yield test_client


@pytest.mark.parametrize("make", [lying_png, real_bomb], ids=["lying-header", "real-bomb"])
def test_decompression_bombs_are_refused_before_decoding(client: TestClient, make) -> None:
    data = make()
    assert len(data) < 200_000
    started = time.perf_counter()
    multipart = client.post(PREDICT, files={"file": ("bomb.png", data, "image/png")})
    as_json = client.post(PREDICT, json={"images": [base64.b64encode(data).decode()]})
    raw = client.post(PREDICT, content=data, headers={"Content-Type": "image/png"})
    elapsed = time.perf_counter() - started
    for response in (multipart, as_json, raw):
        assert response.status_code == 413, response.text
        error = error_of(response)
        assert "max_image_pixels" in error["message"]
    assert "bomb.png" in error_of(multipart)["message"]
    assert elapsed < 2.0  # refused from the header, never decoded
    assert client.post(
        PREDICT, json={"tensor": {"data": np.zeros((1, 1, 8, 8)).tolist()}}
    ).is_success


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slow/1``: 64 channels on 64 x 64 inputs, ~10-20 ms a sample on one thread."""
    root = tmp_path_factory.mktemp("slow") / "models"
    model = make_onnx_cnn(name="slow", channels=(64, 64), image_size=(64, 64), reference_samples=4)
    save_model(model, root / "slow" / "1" / "model.onnx")
    return root


@pytest.mark.network
@pytest.mark.slow
def test_queue_time_and_body_limits_over_a_socket(
    slow_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "RELU_SERVE_MAX_QUEUE_LENGTH": "2",
        "RELU_SERVE_BATCH_MAX_SIZE": "1",
        "RELU_SERVE_REQUEST_TIMEOUT_S": "0.1",
        "RELU_SERVE_MAX_BODY_BYTES": "4000000",
    }.items():
        monkeypatch.setenv(name, value)
    x = np.zeros((48, 1, 64, 64), np.float32)  # a run of ~0.2-0.5 s
    heavy = {"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}}
    light = {
        "tensor": {"shape": [1, 1, 64, 64], "data": base64.b64encode(x[:1].tobytes()).decode()}
    }
    with running_server(slow_root) as (url, _process):
        predict = f"{url}/v1/models/slow/predict"
        responses: list[httpx.Response] = []
        lock = threading.Lock()

        def send() -> None:
            response = httpx.post(predict, json=heavy, timeout=30)
            with lock:
                responses.append(response)

        threads = [threading.Thread(target=send) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = {error_of(r)["code"] for r in responses if r.status_code == 503}
        assert {r.status_code for r in responses} <= {200, 503}
        assert codes == {"queue_full", "timeout"}, [r.text for r in responses]
        for response in responses:
            if response.status_code == 503:
                message = error_of(response)["message"]
                assert "max_queue_length" in message or "request_timeout_s" in message
                if error_of(response)["code"] == "queue_full":
                    assert response.headers["Retry-After"] == "1"

        too_big = httpx.post(predict, content=b"\x00" * 4_000_001, timeout=30)
        assert too_big.status_code == 413
        assert "max_body_bytes" in error_of(too_big)["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(100):
                yield b"\x00" * 65_536

        streamed = httpx.post(
            predict, content=chunks(), headers={"Content-Type": "application/octet-stream"}
        )
        assert streamed.status_code == 413
        assert error_of(streamed)["code"] == "body_too_large"

        time.sleep(1.0)  # abandoned runs finish
        after = httpx.post(predict, json=light, timeout=30)
        assert after.status_code == 200, after.text
