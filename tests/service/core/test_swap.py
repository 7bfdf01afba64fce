"""Hot swaps under load against a real uvicorn server on 127.0.0.1, and a crash mid-upload.

Each uploaded file has constant logits (zero weights in the last layer, a bias of its own),
so every answer names exactly one complete file: an answer from a half-loaded model, or one
whose version label does not match its numbers, cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import numpy_helper

from service.core.repository import ModelRepository
from tests.server_helpers import uvicorn_server
from tests.service.api.test_management import snapshot
from tests.service.conftest import make_onnx_cnn, reference_inputs, save_model

pytestmark = [pytest.mark.network, pytest.mark.slow]
KEY = "swap-test-management-key-000"
AUTH = {"Authorization": f"Bearer {KEY}"}
RAW = {**AUTH, "Content-Type": "application/octet-stream"}
CLIENTS = 8
REQUESTS_PER_CLIENT = 2000  # a cap: clients stop when the swaps are done
# Each round of swaps validates 5 files, each in a child process (~1 s to start, more under
# this load): two rounds at least.
MAX_SECONDS = 30.0


def constant_model(generation: int) -> tuple[bytes, np.ndarray]:
    """A tiny CNN whose logits are a constant of its own: the file and its probabilities."""
    model = make_onnx_cnn(name="swap", seed=generation)
    bias = np.zeros(10, np.float32)
    bias[generation % 10] = 2.0 + 0.25 * generation
    for i, init in enumerate(model.graph.initializer):
        if init.name == "fc.weight":
            zeros = np.zeros(numpy_helper.to_array(init).shape, np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(zeros, init.name))
        elif init.name == "fc.bias":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias, init.name))
    probs = np.exp(bias - bias.max())
    return model.SerializeToString(), probs / probs.sum()


@contextmanager
def running_server(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A uvicorn subprocess serving ``root`` with management on; yields its URL."""
    with uvicorn_server(root, env={"RELU_SERVE_MANAGEMENT_API_KEY": KEY}) as server:
        yield server


def test_swaps_under_load_fail_no_request(tmp_path: Path) -> None:
    root = tmp_path / "models"
    files: dict[str, list[np.ndarray]] = {}  # version -> probabilities of each file it had
    first, probs = constant_model(1)
    save_model_bytes(root / "swap" / "1" / "model.onnx", first)
    files["1"] = [probs]
    x = reference_inputs(2)
    bodies = [
        {"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}},
        {
            "tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()},
            "stats": "summary",
            "top_k": 10,
        },
    ]
    answers: list[tuple[str, list[float]]] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    with running_server(root) as (url, _process):

        def client(index: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in range(REQUESTS_PER_CLIENT):
                    if stop.is_set():
                        return
                    try:
                        response = http.post(
                            "/v1/models/swap/predict",
                            json=bodies[(i + index) % 2],
                            params={"top_k": 10},
                        )
                    except httpx.HTTPError as exc:
                        with lock:
                            failures.append(f"transport: {exc!r}")
                        continue
                    if response.status_code != 200:
                        with lock:
                            failures.append(f"{response.status_code}: {response.text}")
                        continue
                    body = response.json()
                    row = [0.0] * 10
                    for item in body["predictions"][0]["top_k"]:
                        row[item["index"]] = item["probability"]
                    with lock:
                        answers.append((body["model"]["version"], row))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        operations: list[str] = []
        started = time.monotonic()

        def admin(method: str, path: str, **kwargs) -> httpx.Response:
            response = httpx.request(method, f"{url}/v1/admin{path}", timeout=60, **kwargs)
            assert response.status_code in (200, 201), (method, path, response.text)
            operations.append(f"{method} {path} {response.status_code}")
            time.sleep(0.15)  # let requests run on the new state
            return response

        def upload(version: int, generation: int, **params) -> None:
            data, p = constant_model(generation)
            admin("PUT", f"/models/swap/versions/{version}", content=data, headers=RAW,
                  params=params)  # fmt: skip
            files.setdefault(str(version), []).append(p)

        for v in range(2, 5):
            if time.monotonic() - started > MAX_SECONDS:
                break
            upload(v, v)  # the new highest: serves by default at once
            upload(v + 1, 10 + v, default="false")  # staged beside it, not serving
            admin("PUT", "/models/swap/default", json={"version": v + 1}, headers=AUTH)
            admin("PUT", "/models/swap/default", json={"version": v}, headers=AUTH)
            upload(v, 20 + v, overwrite="true")  # the serving version replaced in place
            admin("POST", f"/models/swap/versions/{v + 1}/unload", headers=AUTH)
            admin("PUT", "/models/swap/default", json={"version": None}, headers=AUTH)
            admin("POST", f"/models/swap/versions/{v - 1}/unload", headers=AUTH)
            admin("POST", "/repository/reload", headers=AUTH)  # unloads are kept: no change
            admin("POST", f"/models/swap/versions/{v - 1}/load", headers=AUTH)
            admin("POST", f"/models/swap/versions/{v + 1}/load", headers=AUTH)
            admin("DELETE", f"/models/swap/versions/{v + 1}", headers=AUTH)
            admin("POST", f"/models/swap/versions/{v - 1}/unload", headers=AUTH)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    seen: dict[str, int] = {}
    mismatched = []
    for version, row in answers:
        candidates = files.get(version, [])
        if not any(np.allclose(row, p, atol=1e-6) for p in candidates):
            mismatched.append((version, row))
        seen[version] = seen.get(version, 0) + 1
    print(  # noqa: T201 - the figures the README quotes
        f"\nswap test: {len(answers)} answers, {len(failures)} failures, "
        f"{len(operations)} management operations, answers per version {seen}"
    )
    assert failures == []
    assert mismatched == []
    assert len(answers) >= CLIENTS * 50
    assert len(seen) >= 4  # the swaps happened while the clients were running
    assert len(operations) >= 11


def save_model_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_killed_server_mid_upload_leaves_the_repository_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "models"
    save_model(make_onnx_cnn(name="tiny"), root / "tiny" / "1" / "model.onnx")
    before = snapshot(root)
    # ~75 KB: half of it is more than the staging file's write buffer, so it reaches disk.
    data = make_onnx_cnn(name="tiny", channels=(32, 64), seed=3).SerializeToString()
    with running_server(root) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (
                f"PUT /v1/admin/models/tiny/versions/1?overwrite=true HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            sock.sendall(head.encode() + data[: len(data) // 2])
            deadline = time.monotonic() + 10
            staged: list[Path] = []
            while not staged and time.monotonic() < deadline:
                staged = [p for p in root.glob(".staging/upload-*/model.onnx") if p.stat().st_size]
                time.sleep(0.02)
            assert staged, "the upload never reached the staging folder"
            process.kill()  # SIGKILL: no clean-up of any kind
            process.wait(timeout=10)
    assert snapshot(root) == before
    fresh = ModelRepository(root, threads=1)
    fresh.load_all()
    assert fresh.available() == {"tiny": ["1"]}
    assert (
        fresh.get("tiny").sha256
        == hashlib.sha256((root / "tiny/1/model.onnx").read_bytes()).hexdigest()
    )


def test_tritonclient_repository_extension(tmp_path: Path) -> None:
    import tritonclient.http as http

    root = tmp_path / "models"
    save_model(make_onnx_cnn(name="tiny"), root / "tiny" / "1" / "model.onnx")
    data, probs = constant_model(4)
    with running_server(root) as (url, _process):
        client = http.InferenceServerClient(url.removeprefix("http://"))
        try:
            index = client.get_model_repository_index(headers=AUTH)
            assert index == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
            client.load_model("tiny", headers=AUTH, files={"file:2/model.onnx": data})
            assert client.is_model_ready("tiny", "2")
            x = http.InferInput("input", [1, 1, 8, 8], "FP32")
            x.set_data_from_numpy(reference_inputs(1))
            result = client.infer("tiny", [x], outputs=[http.InferRequestedOutput("probabilities")])
            assert np.allclose(result.as_numpy("probabilities")[0], probs, atol=1e-6)
            client.unload_model("tiny", headers=AUTH)
            assert not client.is_model_ready("tiny")
            client.load_model("tiny", headers=AUTH)  # back from disk: both versions
            assert client.is_model_ready("tiny", "1")
            assert client.is_model_ready("tiny", "2")
            with pytest.raises(Exception, match="wrong API key"):
                client.unload_model("tiny", headers={"Authorization": "Bearer nope"})
        finally:
            client.close()
