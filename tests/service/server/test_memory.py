"""Memory a request can make the server take, bounded before the work starts (issue 15):
images that decode to far more than they weigh, and many bodies at once. Peak memory is the
server process's own high-water mark (``VmHWM``), on a real server.
"""

from __future__ import annotations

import concurrent.futures
import struct
import zlib
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import uvicorn_server
from tests.service.http_helpers import predict_body

pytestmark = pytest.mark.network

PREDICT = "/v1/models/tiny/predict"
MIB = 1024 * 1024


def blank_png(side: int) -> bytes:
    """A valid ``side`` x ``side`` grayscale PNG of zeros: a few KB that decode to side^2 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" * (side + 1)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


BOMB = [("file", (f"{i}.png", blank_png(4096))) for i in range(64)]  # ~1 MB -> 1 GiB decoded


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_the_pixels_of_one_request_are_bounded_before_decoding(model_repo: Path) -> None:
    with uvicorn_server(model_repo) as (url, _):
        response = httpx.post(url + PREDICT, files=BOMB, timeout=30)
        assert response.status_code == 413
        assert response.json()["error"]["message"].endswith("(max_request_pixels)")
        ok = httpx.post(
            url + PREDICT, content=predict_body(2), headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200


@pytest.mark.slow
def test_decode_bombs_stay_within_the_decode_budget(model_repo: Path) -> None:
    # The report's case, smaller: 24 PNGs that each decode to 4096 x 4096 (the report had 64:
    # bench/bench_memory.py), once and then twice at once, with the request pixel limit
    # raised so that they are decoded. Before, 64 took the process 1 GiB above its start and
    # two at once 2 GiB; now the images are decoded one at a time, under a budget that two
    # such images do not fit.
    budget = 200 * MIB
    env = {
        "RELU_SERVE_MAX_REQUEST_PIXELS": str(24 * 4096 * 4096),
        "RELU_SERVE_DECODE_BUDGET_BYTES": str(budget),
        "RELU_SERVE_REQUEST_DEADLINE_S": "60",  # wait for the budget rather than 503
        "RELU_SERVE_REQUEST_TIMEOUT_S": "120",
    }
    with uvicorn_server(model_repo, env=env) as (url, process):
        start = peak_rss(process.pid)

        def bomb() -> int:
            return httpx.post(url + PREDICT, files=BOMB[:24], timeout=120).status_code

        assert bomb() == 200
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda _: bomb(), range(2))) == [200, 200]
        grown = peak_rss(process.pid) - start
        assert grown < budget, f"peak grew {grown / MIB:.0f} MiB"
        ok = httpx.post(
            url + PREDICT, content=predict_body(2), headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200


def test_bodies_held_at_once_are_bounded(model_repo: Path) -> None:
    # A body that could never fit the budget is 413; bodies that fit wait their turn.
    env = {"RELU_SERVE_BODY_BUDGET_BYTES": str(1 * MIB), "RELU_SERVE_MAX_BODY_BYTES": str(4 * MIB)}
    with uvicorn_server(model_repo, env=env) as (url, _):
        big = httpx.post(
            url + PREDICT, content=b"x" * (2 * MIB), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        assert big.json()["error"]["message"].endswith("(body_budget_bytes)")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            url + PREDICT,
                            content=predict_body(64),
                            headers={"content-type": "application/json"},
                        ).status_code
                    ),
                    range(32),
                )
            )
        assert statuses == [200] * 32
