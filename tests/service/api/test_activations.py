"""/v1 live activation monitor routes: reading the window is public, emptying it takes the
management API key, with the same answers as the management API (service/api/auth.py)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import error_of, make_settings

KEY = "test-management-key-0123456789"
RESET = "/v1/models/tiny/activations/reset"
ACTIVATIONS = "/v1/models/tiny/activations"
PREDICT = "/v1/models/tiny/predict"


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    """The management API (and so reset) on, with ``KEY``."""
    with TestClient(create_app(make_settings(model_repo, management_api_key=KEY))) as test:
        yield test


def tensor_body(x: np.ndarray) -> dict:
    return {"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}}


def fill_window(client: TestClient, n: int = 3) -> int:
    """Send ``n`` samples that ask for statistics; returns the window's sample count."""
    body = tensor_body(reference_inputs(n, seed=4))
    response = client.post(PREDICT, params={"stats": "summary"}, json=body)
    assert response.status_code == 200, response.text
    samples = client.get(ACTIVATIONS).json()["samples"]
    assert samples >= n
    return int(samples)


def test_reset_is_off_without_a_management_key(model_repo: Path) -> None:
    with TestClient(create_app(make_settings(model_repo))) as client:
        samples = fill_window(client)
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
            response = client.post(RESET, headers=headers)
            assert response.status_code == 403
            error = error_of(response)
            assert error["code"] == "management_disabled"
            assert "RELU_SERVE_MANAGEMENT_API_KEY" in error["message"]
        assert client.get(ACTIVATIONS).json()["samples"] == samples


def test_reset_needs_the_key(client: TestClient) -> None:
    samples = fill_window(client)
    missing = client.post(RESET)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(missing) == {
        "code": "unauthorized",
        "message": "missing API key: send the header 'Authorization: Bearer <key>'",
    }
    malformed = client.post(RESET, headers={"Authorization": f"Basic {KEY}"})
    assert malformed.status_code == 401
    assert "expected 'Bearer <key>'" in error_of(malformed)["message"]
    wrong = client.post(RESET, headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 403
    assert error_of(wrong) == {"code": "invalid_api_key", "message": "wrong API key"}
    assert client.get(ACTIVATIONS).json()["samples"] == samples  # nothing was wiped

    right = client.post(RESET, headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200
    assert right.json() == {"model": "tiny", "reset": True}
    snapshot = client.get(ACTIVATIONS)  # reading stays public
    assert snapshot.status_code == 200
    assert snapshot.json()["samples"] == 0
    # Predictions need no key, before or after a reset, and feed the new window.
    assert client.post(PREDICT, json=tensor_body(reference_inputs(1))).status_code == 200
    assert fill_window(client, 2) == 2


def test_the_key_is_checked_before_the_model_name(client: TestClient) -> None:
    """Without the key, an unknown model is a 401 like a known one: no probing for names."""
    assert client.post("/v1/models/nope/activations/reset").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    unknown = client.post("/v1/models/nope/activations/reset", headers=auth)
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "model_not_found"


def test_reset_declares_the_bearer_scheme_in_openapi(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    reset = schema["paths"]["/v1/models/{name}/activations/reset"]["post"]
    management = schema["paths"]["/v1/admin/repository"]["get"]
    assert reset["security"] == management["security"] == [{"ManagementKey": []}]
    assert {"401", "403"} <= set(reset["responses"])
    assert "WWW-Authenticate" in reset["responses"]["401"]["headers"]
    assert "security" not in schema["paths"]["/v1/models/{name}/activations"]["get"]
