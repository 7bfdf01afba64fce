"""Finite inputs that overflow inside the model (issue 15, item 3), on a real server as shipped
(``python -m service``: the monitor's counts in mapped files under its shared folder).

A float32 tensor of 3e38 is finite, so it passes the input check, but the first convolution
overflows to infinity and the next one makes NaN of it: the request is answered 422
``non_finite_output`` naming the sample (v1 and v2), and its samples never reach the live
monitor, which stays finite and sane in the API and in /metrics.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service.api.v2_codec import HEADER_LENGTH
from tests.server_helpers import uvicorn_server
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import TINY_LAYERS, oracle

pytestmark = pytest.mark.network

OVERFLOW = 3e38  # finite in float32 (max 3.4e38); a 3x3 convolution of it is not
NORMAL_REQUESTS = 10
ADMIN_KEY = "overflow-test-admin-key"
MONITOR_FAMILIES = ("relu_serve_activation_", "relu_serve_monitor_")


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[str]:
    """The service on the fixture repository; the monitor claims dead units and drift from
    ``NORMAL_REQUESTS`` samples on."""
    env = {
        "RELU_SERVE_MONITOR_MIN_SAMPLES": str(NORMAL_REQUESTS),
        "RELU_SERVE_MANAGEMENT_API_KEY": ADMIN_KEY,  # the monitor's reset takes it
    }
    with uvicorn_server(model_repo, env=env) as (url, _process):
        yield url


def send_v1(client: httpx.Client, x: np.ndarray) -> tuple[httpx.Response, np.ndarray | None]:
    """/v1 predict of tensor ``x`` with statistics; the answer and its (N, 10) probabilities."""
    tensor = {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}
    response = client.post(
        "/v1/models/tiny/predict",
        params={"stats": "channels", "top_k": 10},
        json={"tensor": tensor},
    )
    if response.status_code != 200:
        return response, None
    probabilities = np.zeros((x.shape[0], 10))
    for row, item in enumerate(response.json()["predictions"]):
        for entry in item["top_k"]:
            probabilities[row, entry["index"]] = entry["probability"]  # null -> TypeError
    return response, probabilities


def send_v2(client: httpx.Client, x: np.ndarray) -> tuple[httpx.Response, np.ndarray | None]:
    """/v2 JSON infer of ``x`` asking for probabilities and statistics outputs."""
    outputs = [{"name": "probabilities"}]
    outputs += [{"name": f"stats/{layer}/inactive_fraction"} for layer in TINY_LAYERS]
    outputs += [{"name": f"stats/{layer}/channel_activity"} for layer in TINY_LAYERS]
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": outputs,
    }
    response = client.post("/v2/models/tiny/infer", json=request)
    if response.status_code != 200:
        return response, None
    (probabilities,) = [o for o in response.json()["outputs"] if o["name"] == "probabilities"]
    return response, np.asarray(probabilities["data"], dtype=np.float64).reshape(-1, 10)


def error_message(response: httpx.Response, protocol: str) -> str:
    """The error's message; on /v1 its code must be ``non_finite_output``."""
    body = response.json()
    if protocol == "v2":
        assert set(body) == {"error"}, body
        return str(body["error"])
    assert body["error"]["code"] == "non_finite_output", body
    return str(body["error"]["message"])


def monitor_samples(text: str) -> list[tuple[str, float]]:
    """The monitor's samples of model tiny in a /metrics exposition: (series, value)."""
    found = []
    for line in text.splitlines():
        if line.startswith(MONITOR_FAMILIES) and 'model="tiny"' in line:
            series, _, value = line.rpartition(" ")
            found.append((series, float(value)))
    return found


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_an_input_that_overflows_inside_the_model_is_422_and_stays_out_of_the_monitor(
    server: str, tiny_cnn_path: Path, protocol: str
) -> None:
    send = send_v1 if protocol == "v1" else send_v2
    with httpx.Client(base_url=server, timeout=30) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert client.post("/v1/models/tiny/activations/reset", headers=admin).status_code == 200
        x = reference_inputs(2, seed=5)
        x[1] = OVERFLOW  # sample 1 overflows; sample 0 is an ordinary image
        assert np.isfinite(x).all()
        response, _ = send(client, x)
        assert response.status_code == 422, response.text
        message = error_message(response, protocol)
        assert "sample 1 " in message, message
        assert "not finite" in message, message
        assert "overflows" in message, message

        # the very next requests are answered as usual, and the oracle's answer
        for seed in range(NORMAL_REQUESTS):
            x = reference_inputs(1, seed=100 + seed)
            response, probabilities = send(client, x)
            assert response.status_code == 200, response.text
            expected = oracle(tiny_cnn_path, x)["probabilities"]
            np.testing.assert_allclose(probabilities, expected, atol=1e-6)

        snapshot = client.get("/v1/models/tiny/activations").json()
        assert snapshot["samples"] == NORMAL_REQUESTS  # the overflowing request added none
        assert snapshot["window_full"] is True
        assert snapshot["drifted"] is False
        assert 0.0 <= snapshot["drift"] < snapshot["drift_threshold"]
        for layer in snapshot["layers"]:
            assert 0.0 <= layer["inactive_fraction"] <= 1.0, layer
            assert all(0.0 <= rate <= 1.0 for rate in layer["channel_activity"]), layer
            assert 0.0 <= layer["drift"] < snapshot["drift_threshold"], layer
            assert layer["drifted"] is False
            assert isinstance(layer["dead_units"], int)

        series = monitor_samples(client.get("/metrics").text)
        assert series, "no monitor series for model tiny"
        bad = [(name, value) for name, value in series if not math.isfinite(value) or value < 0]
        assert not bad, bad  # no NaN, no infinity, no count gone negative


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_input_values_that_are_not_finite_are_400_naming_the_sample(
    server: str, protocol: str
) -> None:
    x = reference_inputs(3, seed=6)
    x[2, 0, 1, 1] = np.inf  # not JSON: sent as base64 (v1) or binary (v2)
    with httpx.Client(base_url=server, timeout=30) as client:
        if protocol == "v1":
            response, _ = send_v1(client, x)
            assert response.json()["error"]["code"] == "invalid_input"
            message = response.json()["error"]["message"]
        else:
            header = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ]
            }
            head = orjson.dumps(header)
            response = client.post(
                "/v2/models/tiny/infer",
                content=head + x.tobytes(),
                headers={HEADER_LENGTH: str(len(head))},
            )
            message = response.json()["error"]
        assert response.status_code == 400, response.text
        assert "1 non-finite values (NaN or infinity), in sample 2" in message
