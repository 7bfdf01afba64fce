"""A real uvicorn server on 127.0.0.1, driven by Triton's own HTTP client and by httpx.

What TestClient cannot show: the protocol as a third-party client speaks it over a socket,
the process's start-up from the environment, and a graceful shutdown on SIGTERM.
"""

from __future__ import annotations

import base64
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as tritonclient_http
from tritonclient.utils import InferenceServerException

from tests.server_helpers import uvicorn_server
from tests.service.conftest import EMBEDDING, reference_inputs
from tests.service.http_helpers import TINY_LAYERS, image_bytes

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[str]:
    """``host:port`` of a uvicorn subprocess serving the fixture repository; on teardown it
    gets SIGTERM and must exit cleanly."""
    with uvicorn_server(model_repo, args=["--log-level", "info"]) as (url, process):
        yield url.removeprefix("http://")
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("server did not shut down within 20 s of SIGTERM")
        output = process.stdout.read().decode() if process.stdout else ""
        # uvicorn re-raises the signal it caught once shut down, so the exit status reports it.
        assert code in (0, -signal.SIGTERM), output
        assert "Application shutdown complete." in output, output


@pytest.fixture
def triton(server: str) -> Iterator[object]:
    client = tritonclient_http.InferenceServerClient(url=server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def twohead_server(two_output_model_path: Path) -> Iterator[str]:
    """``host:port`` of a server for the two-output model with legacy layer names."""
    env = {"RELU_SERVE_BATCH_MAX_SIZE": "16", "RELU_SERVE_BATCH_MAX_DELAY_MS": "2"}
    with uvicorn_server(two_output_model_path.parents[2], env=env) as (url, _process):
        yield url.removeprefix("http://")


def v1_channel_stats(server: str, x: np.ndarray) -> dict[str, dict]:
    response = httpx.post(
        f"http://{server}/v1/models/tiny/predict",
        params={"stats": "channels", "top_k": 10},
        json={"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return {layer["name"]: layer for layer in response.json()["stats"]["layers"]}


def test_server_health_and_metadata(triton) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "relu-serve"
    assert "binary_tensor_data" in metadata["extensions"]
    assert triton.is_model_ready("tiny")
    assert triton.is_model_ready("tiny", "1")
    model = triton.get_model_metadata("tiny", "1")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    names = [o["name"] for o in model["outputs"]]
    assert {"logits", "probabilities", "stats/features.0.act/channel_activity"} <= set(names)


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary(triton, server: str, binary: bool) -> None:
    x = reference_inputs(3, seed=8)
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary),
        tritonclient_http.InferRequestedOutput("logits", binary_data=binary),
    ]
    result = triton.infer("tiny", [tensor], outputs=outputs, request_id="r1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    assert result.get_response()["id"] == "r1"
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    v1 = httpx.post(
        f"http://{server}/v1/models/tiny/predict",
        params={"top_k": 1},
        json={"tensor": {"data": x.tolist()}},
        timeout=10,
    ).json()
    for i in range(3):
        best = v1["predictions"][i]["top_k"][0]
        assert int(np.argmax(probabilities[i])) == best["index"]
        assert probabilities[i, best["index"]] == pytest.approx(best["probability"], rel=1e-5)


def test_infer_without_outputs_returns_all_as_binary(triton) -> None:
    x = reference_inputs(2)
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton.infer("tiny", [tensor], model_version="2")
    assert result.as_numpy("logits").shape == (2, 10)
    assert result.as_numpy("probabilities").shape == (2, 10)
    response = result.get_response()
    assert response["model_version"] == "2"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])


def test_statistics_outputs_match_v1(triton, server: str) -> None:
    x = reference_inputs(4, seed=21)
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = []
    for layer in TINY_LAYERS:
        outputs.append(tritonclient_http.InferRequestedOutput(f"stats/{layer}/channel_activity"))
        outputs.append(
            tritonclient_http.InferRequestedOutput(
                f"stats/{layer}/inactive_fraction", binary_data=False
            )
        )
        outputs.append(tritonclient_http.InferRequestedOutput(f"stats/{layer}/dead_units"))
    result = triton.infer("tiny", [tensor], outputs=outputs)
    v1 = v1_channel_stats(server, x)
    for layer in TINY_LAYERS:
        active = result.as_numpy(f"stats/{layer}/channel_activity")
        assert active.shape == (4, v1[layer]["channels"])
        assert np.allclose(active.mean(axis=0), v1[layer]["channel_activity"], atol=1e-6)
        inactive = result.as_numpy(f"stats/{layer}/inactive_fraction")
        assert inactive[0] == pytest.approx(v1[layer]["inactive_fraction"], abs=1e-6)
        assert int(result.as_numpy(f"stats/{layer}/dead_units")[0]) == v1[layer]["dead_units"]


def test_protocol_errors_reach_the_client(triton) -> None:
    tensor = tritonclient_http.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="nope"):
        triton.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="no output 'softmax'"):
        triton.infer("tiny", [tensor], outputs=[tritonclient_http.InferRequestedOutput("softmax")])
    wrong = tritonclient_http.InferInput("input", [1, 64], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [wrong])
    assert info.value.status() == "400"
    assert triton.is_server_ready()


def test_multipart_predict_with_httpx(server: str) -> None:
    files = [
        ("file", ("one.png", image_bytes("PNG", (8, 8)), "image/png")),
        ("file", ("two.jpg", image_bytes("JPEG", (15, 9), "RGB"), "image/jpeg")),
    ]
    response = httpx.post(
        f"http://{server}/v1/models/tiny/predict", params={"top_k": 3}, files=files, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["input"] for p in body["predictions"]] == ["one.png", "two.jpg"]
    assert all(len(p["top_k"]) == 3 for p in body["predictions"])


def test_metrics_over_the_socket(server: str) -> None:
    response = httpx.get(f"http://{server}/metrics", timeout=10)
    assert response.status_code == 200
    assert "relu_serve_http_requests_total" in response.text
    info = (
        r'relu_serve_model_info\{model="tiny",provider="CPUExecutionProvider",[^}]*version="2"\} 1'
    )
    assert re.search(info, response.text)


def test_model_config_as_triton_answers_it(triton) -> None:
    """Issue 16: ``get_model_config`` was a 404."""
    config = triton.get_model_config("tiny")
    assert config == triton.get_model_config("tiny", "2")
    assert config["name"] == "tiny"
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 64  # MAX_BATCH_SIZE: the batch axis is dynamic
    assert config["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [1, 8, 8]}
    ]
    assert config["output"] == [
        {"name": "logits", "data_type": "TYPE_FP32", "dims": [10]},
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
    ]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [64],
        "max_queue_delay_microseconds": 0,
    }
    assert config["instance_group"] == [{"name": "tiny", "kind": "KIND_CPU", "count": 1}]
    statistics = orjson.loads(config["parameters"]["activation_statistics"]["string_value"])
    assert statistics[f"stats/{TINY_LAYERS[0]}/channel_activity"] == {
        "layer": TINY_LAYERS[0],
        "statistic": "channel_activity",
        "datatype": "FP32",
        "shape": [-1, 4],
    }
    assert "model_configuration" in triton.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="nope"):
        triton.get_model_config("nope")


def test_two_outputs_and_clean_statistics_names(
    twohead_server: str, two_output_model_path: Path
) -> None:
    """Issue 16: a second model output is served, all outputs by default, and statistics
    of legacy-named layers have clean names."""
    client = tritonclient_http.InferenceServerClient(url=twohead_server)
    try:
        config = client.get_model_config("twohead")
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
        assert [(o["name"], o["dims"]) for o in config["output"]] == [
            ("logits", [10]),
            (EMBEDDING, [8]),
            ("probabilities", [10]),
        ]
        names = [o["name"] for o in client.get_model_metadata("twohead")["outputs"]]
        assert "stats/relu/Relu/channel_activity" in names
        assert not any("//" in n for n in names)
        x = reference_inputs(3, seed=13)
        tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("twohead", [tensor])  # no outputs named: all of the model's
        session = ort.InferenceSession(
            str(two_output_model_path), providers=["CPUExecutionProvider"]
        )
        logits, embedding = session.run(["logits", EMBEDDING], {"input": x})
        assert np.allclose(result.as_numpy("logits"), logits, atol=1e-5)
        assert np.allclose(result.as_numpy(EMBEDDING), embedding, atol=1e-5)
        assert result.as_numpy("probabilities").shape == (3, 10)
        outputs = [
            tritonclient_http.InferRequestedOutput(EMBEDDING, binary_data=False),
            tritonclient_http.InferRequestedOutput("stats/block/act/Relu/inactive_fraction"),
        ]
        named = client.infer("twohead", [tensor], outputs=outputs)
        assert np.allclose(named.as_numpy(EMBEDDING), embedding, atol=1e-5)
        assert named.as_numpy("logits") is None
        assert 0.0 <= float(named.as_numpy("stats/block/act/Relu/inactive_fraction")[0]) <= 1.0
    finally:
        client.close()
