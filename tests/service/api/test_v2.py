"""/v2: the Open Inference Protocol, Triton's binary extension, statistics as named outputs."""

from __future__ import annotations

import base64
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.api.v2_codec import HEADER_LENGTH, decode_infer_request, encode_infer_response
from service.app import create_app
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import TINY_LAYERS, make_settings, oracle

INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo))) as test_client:
        yield test_client


def json_input(x: np.ndarray, name: str = "input", nested: bool = False) -> dict[str, Any]:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": data}


def split_binary(response: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse a response with the binary extension: JSON header, then outputs' bytes in order."""
    raw = response.content
    length = response.headers.get(HEADER_LENGTH)
    head = orjson.loads(raw[: int(length)] if length else raw)
    blobs = raw[int(length) :] if length else b""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for output in head["outputs"]:
        dtype = {"FP32": "<f4", "INT32": "<i4"}[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(
                output["shape"]
            )
        else:
            chunk = blobs[offset : offset + size]
            arrays[output["name"]] = np.frombuffer(chunk, dtype=dtype).reshape(output["shape"])
            offset += size
    assert offset == len(blobs)
    return head, arrays


def test_server_live_ready_and_metadata(client: TestClient) -> None:
    live = client.get("/v2/health/live")
    ready = client.get("/v2/health/ready")
    assert (live.status_code, live.content) == (200, b"")
    assert (ready.status_code, ready.content) == (200, b"")
    metadata = client.get("/v2")
    assert metadata.status_code == 200
    body = metadata.json()
    assert body["name"] == "relu-serve"
    assert isinstance(body["version"], str)
    assert body["version"]
    assert "binary_tensor_data" in body["extensions"]


def test_model_metadata_lists_inputs_outputs_and_statistics(client: TestClient) -> None:
    response = client.get("/v2/models/tiny")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "tiny"
    assert body["versions"] == ["1", "2"]
    assert body["platform"] == "onnxruntime_onnx"
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["logits"] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert outputs["probabilities"]["shape"] == [-1, 10]
    assert outputs["stats/features.0.act/channel_activity"]["shape"] == [-1, 4]
    assert outputs["stats/features.1.act/channel_activity"]["shape"] == [-1, 8]
    assert outputs["stats/features.0.act/inactive_fraction"]["shape"] == [1]
    assert outputs["stats/features.0.act/dead_units"]["datatype"] == "INT32"
    assert "stats/features.0.act/saturated_fraction" not in outputs  # ReLU does not saturate
    version = client.get("/v2/models/tiny/versions/1")
    assert version.status_code == 200
    assert version.json()["inputs"] == body["inputs"]


def test_foreign_model_metadata_has_its_own_names(client: TestClient) -> None:
    body = client.get("/v2/models/foreign").json()
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    names = [o["name"] for o in body["outputs"]]
    assert names[:2] == ["output", "probabilities"]
    assert any(n.endswith("/saturated_fraction") for n in names)  # its Sigmoid layer


def test_model_ready(client: TestClient) -> None:
    assert client.get("/v2/models/tiny/ready").status_code == 200
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    missing = client.get("/v2/models/nope/ready")
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]


@pytest.mark.parametrize("nested", [False, True])
def test_json_infer_returns_logits_and_probabilities(
    client: TestClient, tiny_cnn_path: Path, nested: bool
) -> None:
    x = reference_inputs(3)
    response = client.post(INFER, json={"id": "42", "inputs": [json_input(x, nested=nested)]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    head, arrays = split_binary(response)
    assert head["id"] == "42"
    assert head["model_name"] == "tiny"
    assert head["model_version"] == "2"
    assert [o["name"] for o in head["outputs"]] == ["logits", "probabilities"]
    expected = oracle(tiny_cnn_path, x)
    assert np.allclose(arrays["logits"], expected["logits"], atol=1e-5)
    assert np.allclose(arrays["probabilities"], expected["probabilities"], atol=1e-6)


def test_binary_input_and_binary_outputs(client: TestClient, tiny_cnn_path: Path) -> None:
    x = reference_inputs(2, seed=5)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "logits", "parameters": {"binary_data": False}},
            ],
        }
    )
    response = client.post(
        "/v2/models/tiny/versions/1/infer",
        content=header + x.astype("<f4").tobytes(),
        headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    head, arrays = split_binary(response)
    assert head["model_version"] == "1"
    outputs = {o["name"]: o for o in head["outputs"]}
    assert outputs["probabilities"]["parameters"] == {"binary_data_size": 2 * 10 * 4}
    assert "data" in outputs["logits"]
    expected = oracle(tiny_cnn_path, x)
    assert np.allclose(arrays["probabilities"], expected["probabilities"], atol=1e-6)
    assert np.allclose(arrays["logits"], expected["logits"], atol=1e-5)


def test_binary_data_output_applies_unless_an_output_overrides(client: TestClient) -> None:
    x = reference_inputs(1)
    response = client.post(
        INFER,
        json={
            "inputs": [json_input(x)],
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "logits"},
                {"name": "probabilities", "parameters": {"binary_data": False}},
            ],
        },
    )
    assert response.status_code == 200, response.text
    head, _ = split_binary(response)
    outputs = {o["name"]: o for o in head["outputs"]}
    assert outputs["logits"]["parameters"] == {"binary_data_size": 40}
    assert "data" in outputs["probabilities"]
    default = client.post(
        INFER, json={"inputs": [json_input(x)], "parameters": {"binary_data_output": True}}
    )
    head, _ = split_binary(default)
    assert all("binary_data_size" in o["parameters"] for o in head["outputs"])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request(client: TestClient, encoding: str) -> None:
    x = reference_inputs(1)
    raw = orjson.dumps({"inputs": [json_input(x)]})
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    response = client.post(INFER, content=body, headers={"Content-Encoding": encoding})
    assert response.status_code == 200, response.text


def test_statistics_outputs_agree_with_v1_and_the_oracle(
    client: TestClient, tiny_cnn_path: Path
) -> None:
    x = reference_inputs(5, seed=11)
    outputs = []
    for layer in TINY_LAYERS:
        for quantity in ("channel_activity", "inactive_fraction", "dead_units", "mean", "max"):
            outputs.append({"name": f"stats/{layer}/{quantity}"})
    response = client.post(INFER, json={"inputs": [json_input(x)], "outputs": outputs})
    assert response.status_code == 200, response.text
    head, arrays = split_binary(response)
    assert [o["name"] for o in head["outputs"]] == [o["name"] for o in outputs]
    v1 = client.post(
        "/v1/models/tiny/predict",
        params={"stats": "channels"},
        json={"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}},
    ).json()["stats"]["layers"]
    expected = oracle(tiny_cnn_path, x)["layers"]
    for v1_layer in v1:
        name = v1_layer["name"]
        active = arrays[f"stats/{name}/channel_activity"]
        assert active.shape == (5, v1_layer["channels"])
        assert np.allclose(active, expected[name]["per_sample_active"], atol=1e-6)
        assert np.allclose(active.mean(axis=0), v1_layer["channel_activity"], atol=1e-6)
        inactive = arrays[f"stats/{name}/inactive_fraction"]
        assert inactive.shape == (1,)
        assert inactive[0] == pytest.approx(v1_layer["inactive_fraction"], abs=1e-6)
        assert int(arrays[f"stats/{name}/dead_units"][0]) == v1_layer["dead_units"]
        assert arrays[f"stats/{name}/mean"][0] == pytest.approx(v1_layer["mean"], rel=1e-5)
        assert arrays[f"stats/{name}/max"][0] == pytest.approx(v1_layer["max"], rel=1e-5)


def test_dead_units_output_on_a_dead_channel_model(
    tmp_path: Path, dead_channel_model_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "dead" / "1").mkdir(parents=True)
    (root / "dead" / "1" / "model.onnx").write_bytes(dead_channel_model_path.read_bytes())
    with TestClient(create_app(make_settings(root))) as client:
        x = reference_inputs(4)
        response = client.post(
            "/v2/models/dead/infer",
            json={
                "inputs": [json_input(x)],
                "outputs": [
                    {"name": "stats/features.0.act/dead_units"},
                    {"name": "stats/features.0.act/channel_activity"},
                ],
            },
        )
    assert response.status_code == 200, response.text
    _, arrays = split_binary(response)
    assert arrays["stats/features.0.act/dead_units"].tolist() == [1]
    assert np.all(arrays["stats/features.0.act/channel_activity"][:, 0] == 0)


# ---------------------------------------------------------------- codec unit tests


def test_codec_round_trip_of_binary_outputs() -> None:
    probabilities = np.arange(6, dtype=np.float32).reshape(2, 3)
    dead = np.array([3], dtype=np.int32)
    body, headers = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=[("p", probabilities, True), ("d", dead, False)],
    )
    length = int(headers[HEADER_LENGTH])
    head = orjson.loads(body[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert head["outputs"][1]["data"] == [3]
    assert np.array_equal(np.frombuffer(body[length:], "<f4").reshape(2, 3), probabilities)


def test_codec_decodes_tritonclient_style_requests() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 32},
                },
                {"name": "b", "shape": [1], "datatype": "FP32", "data": [1.5]},
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    request = decode_infer_request(head + x.tobytes(), header_length=str(len(head)))
    assert request.binary_data_output is True
    assert request.outputs is None
    assert np.array_equal(request.inputs[0].array, x)
    assert request.inputs[1].array.tolist() == [1.5]
