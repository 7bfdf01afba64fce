"""service.api.middleware's request metrics: label sets stay bounded whatever clients send,
and a request looks no label child up once its kind has been seen."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core.metrics import ServiceMetrics
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import make_settings

NS = "relu_serve"
RAW = {
    "content": reference_inputs(1).tobytes(),
    "headers": {"Content-Type": "application/octet-stream"},
}


@pytest.fixture
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo))) as client:
        yield client


def request_series(metrics: ServiceMetrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every series of the HTTP request families: sample name and labels, values left out."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in metrics.registry.collect()
        if family.name.startswith(f"{NS}_http_")
        for sample in family.samples
    }


def test_unknown_models_and_paths_add_no_series(client: TestClient) -> None:
    metrics: ServiceMetrics = client.app.state.metrics  # type: ignore[attr-defined]
    names: list[str] = []

    def send_unknowns() -> None:
        name = uuid.uuid4().hex
        names.append(name)
        response = client.post(f"/v1/models/{name}/predict?shape=1,1,8,8", **RAW)
        assert response.status_code == 404
        assert client.get(f"/no/such/{name}").status_code == 404

    send_unknowns()  # the first ones create the "" model and the "unmatched" route series
    before = request_series(metrics)
    for _ in range(50):
        send_unknowns()
    assert request_series(metrics) == before
    counted = metrics.registry.get_sample_value(
        f"{NS}_http_requests_total",
        {"route": "unmatched", "method": "GET", "model": "", "status": "4xx"},
    )
    assert counted == 51
    assert not any(name in str(before) for name in names)


def test_a_seen_kind_of_request_looks_up_no_label_child(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics: ServiceMetrics = client.app.state.metrics  # type: ignore[attr-defined]
    assert client.post("/v1/models/tiny/predict?shape=1,1,8,8", **RAW).status_code == 200
    lookups = []

    def counting(original: Any) -> Any:
        def labels(*args: Any, **kwargs: Any) -> Any:
            lookups.append(kwargs)
            return original(*args, **kwargs)

        return labels

    for family in (metrics.requests, metrics.request_seconds):
        monkeypatch.setattr(family, "labels", counting(family.labels))
    for _ in range(5):
        assert client.post("/v1/models/tiny/predict?shape=1,1,8,8", **RAW).status_code == 200
    assert lookups == []
    assert client.get("/health/live").status_code == 200  # a new kind: one lookup each
    assert len(lookups) == 2
    counted = metrics.registry.get_sample_value(
        f"{NS}_http_requests_total",
        {"route": "/v1/models/{name}/predict", "method": "POST", "model": "tiny", "status": "2xx"},
    )
    assert counted == 6
