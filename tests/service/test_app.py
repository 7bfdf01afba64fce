"""The app factory and lifespan: readiness, model listing and metadata, docs, live monitor."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import DEFAULT_MODEL_ROOT, ServiceSettings
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import TINY_LAYERS, error_of, image_bytes, make_settings


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo))) as test_client:
        yield test_client


def tensor_body(x: np.ndarray) -> dict:
    return {"tensor": {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}}


def test_models_load_in_the_lifespan_not_in_the_factory(model_repo: Path) -> None:
    app = create_app(make_settings(model_repo))
    assert app.state.plane.ready is False
    assert app.state.plane.repository is None  # nothing loaded at construction
    client = TestClient(app)
    # Without the lifespan nothing is loaded: not ready, and the reason is in the body.
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert error_of(response)["code"] == "not_ready"
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/health/live").status_code == 200
    with client:
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/ready").json() == {"status": "ready", "models": 2}
        assert client.get("/v2/health/ready").status_code == 200
    # Shutdown ran: readiness is off again.
    assert app.state.plane.ready is False


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200


def test_list_models(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert set(models) == {"tiny", "foreign"}
    assert [str(v) for v in models["tiny"]["versions"]] == ["1", "2"]
    assert str(models["tiny"]["latest"]) == "2"


def test_model_metadata(client: TestClient) -> None:
    response = client.get("/v1/models/tiny")
    assert response.status_code == 200
    info = response.json()
    assert info["name"] == "tiny"
    assert str(info["version"]) == "2"
    assert info["input"]["name"] == "input"
    assert info["labels"] == [str(i) for i in range(10)]
    assert info["preprocessing"]["height"] == 8
    assert [layer["name"] for layer in info["activation_layers"]] == list(TINY_LAYERS)
    assert info["providers"]["used"][0] == "CPUExecutionProvider"
    assert info["fell_back"] is False
    first = client.get("/v1/models/tiny/versions/1")
    assert first.status_code == 200
    assert str(first.json()["version"]) == "1"


def test_foreign_model_metadata(client: TestClient) -> None:
    info = client.get("/v1/models/foreign").json()
    assert info["input"]["name"] == "x"
    assert info["preprocessing"] is None
    assert info["activation_layers"]  # found in the graph itself


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    tags = {t["name"] for t in schema["tags"]}
    assert {"models", "predict", "activations", "health", "metrics"} <= tags
    predict = schema["paths"]["/v1/models/{name}/predict"]["post"]
    assert predict["summary"]
    assert predict["tags"] == ["predict"]
    assert {"multipart/form-data", "application/json", "application/octet-stream"} <= set(
        predict["requestBody"]["content"]
    )
    params = {p["name"] for p in predict["parameters"]}
    assert {"top_k", "stats", "shape"} <= params
    assert "/v2/models/{name}/infer" in schema["paths"]


def test_live_monitor_counts_requests_that_asked_for_statistics(model_repo: Path) -> None:
    key = "test-management-key-0123456789"
    auth = {"Authorization": f"Bearer {key}"}
    settings = make_settings(model_repo, monitor_min_samples=16, management_api_key=key)
    with TestClient(create_app(settings)) as client:
        plane = client.app.state.plane  # type: ignore[attr-defined]
        assert client.post("/v1/models/tiny/activations/reset", headers=auth).status_code == 200
        before = plane.monitor_snapshot("tiny")
        plain = client.post("/v1/models/tiny/predict", json=tensor_body(reference_inputs(4)))
        assert plain.status_code == 200
        assert plane.monitor_snapshot("tiny") == before  # default sampling: "requested" only
        asked = client.post(
            "/v1/models/tiny/predict",
            params={"stats": "summary"},
            json=tensor_body(reference_inputs(4, seed=2)),
        )
        assert asked.status_code == 200
        response = client.get("/v1/models/tiny/activations")
        assert response.status_code == 200
        snapshot = response.json()
        assert snapshot != before
        assert snapshot["samples"] == 4
        reset = client.post("/v1/models/tiny/activations/reset", headers=auth)
        assert reset.status_code == 200
        assert client.get("/v1/models/tiny/activations").json()["samples"] == 0


def test_sampling_feeds_the_monitor_without_changing_answers(model_repo: Path) -> None:
    settings = make_settings(model_repo, monitor_sampling=1.0)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/models/tiny/predict", files={"file": ("a", image_bytes())})
        assert response.status_code == 200
        assert "stats" not in response.json()  # the client did not ask
        snapshot = client.get("/v1/models/tiny/activations").json()
        assert snapshot["samples"] == 1


@pytest.mark.usefixtures("cpu_only")
def test_a_provider_fall_back_is_reported_per_model(model_repo: Path) -> None:
    """foreign asks for CUDA (absent on this CPU build): it falls back, loudly; tiny does not."""
    settings = make_settings(model_repo, model_providers={"foreign": ["cuda", "cpu"]})
    with TestClient(create_app(settings)) as client:
        foreign = client.get("/v1/models/foreign").json()
        tiny = client.get("/v1/models/tiny").json()
        metrics = client.get("/metrics").text
    assert foreign["providers"]["requested"][0] == "CUDAExecutionProvider"
    assert foreign["providers"]["used"] == ["CPUExecutionProvider"]
    assert foreign["fell_back"] is True
    assert "CUDAExecutionProvider" in foreign["fallback_reason"]
    assert tiny["fell_back"] is False
    assert 'relu_serve_model_provider_fallback{model="foreign",version="1"} 1.0' in metrics
    assert 'relu_serve_model_provider_fallback{model="tiny",version="2"} 0.0' in metrics


@pytest.mark.usefixtures("cpu_only")
def test_strict_providers_refuse_to_start(model_repo: Path) -> None:
    settings = make_settings(model_repo, providers=["cuda"], strict_providers=True)
    app = create_app(settings)
    with pytest.raises(Exception, match="CUDAExecutionProvider"), TestClient(app):
        pass
    assert app.state.plane.ready is False


def test_default_settings_serve_the_shipped_model() -> None:
    """Out of the box: the default model_root is the repository's models/ folder."""
    settings = make_settings(DEFAULT_MODEL_ROOT)
    assert ServiceSettings.model_fields["model_root"].default == DEFAULT_MODEL_ROOT
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/models/digits/predict",
            params={"stats": "summary"},
            files={"file": ("digit.png", image_bytes("PNG", (32, 32)))},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "digits"
    assert len(body["predictions"][0]["top_k"]) == 5
    assert all(layer["kind"] == "relu" for layer in body["stats"]["layers"])
