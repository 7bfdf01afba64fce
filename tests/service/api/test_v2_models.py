"""/v2 as Triton clients expect it (issue 16): every model output, clean statistics names,
one name per statistic across v1, v2 and the docs, and the model configuration."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.api.v2_models import (
    CHANNEL_ACTIVITY,
    SATURATED_FRACTION,
    SUMMARY_STATISTICS,
    clean_layer_name,
    v2_layer_names,
)
from service.app import create_app
from tests.service.api.test_v2 import json_input, split_binary
from tests.service.conftest import EMBEDDING, LEGACY_LAYER_NAMES, reference_inputs
from tests.service.http_helpers import make_settings

REPO_ROOT = Path(__file__).resolve().parents[3]
STATISTICS = {CHANNEL_ACTIVITY, *SUMMARY_STATISTICS, SATURATED_FRACTION}
# Fields of a v1 layer summary that are not statistics, and v1's one without a v2 output.
V1_NOT_STATISTICS = {"name", "kind", "channels", "samples"}
V1_ONLY = {"dead_channels"}  # a list per request: no fixed-shape v2 tensor


@pytest.fixture(scope="module")
def twohead(two_output_model_path: Path) -> Iterator[TestClient]:
    root = two_output_model_path.parents[2]
    with TestClient(create_app(make_settings(root, batch_max_delay_ms=2.0))) as client:
        yield client


@pytest.mark.parametrize(
    ("name", "clean"),
    [
        ("/relu/Relu", "relu/Relu"),
        ("/block//act/Relu", "block/act/Relu"),
        ("features.0.act", "features.0.act"),
        ("trailing/", "trailing"),
        ("///", "layer"),
    ],
)
def test_clean_layer_name(name: str, clean: str) -> None:
    assert clean_layer_name(name) == clean


def test_v2_layer_names_are_unique_and_keep_clean_names() -> None:
    names = ["/relu/Relu", "relu/Relu", "relu//Relu", "relu/Relu_2", "a"]
    clean = v2_layer_names(names)
    assert clean["relu/Relu"] == "relu/Relu"  # already clean: itself, whatever the order
    assert clean["relu/Relu_2"] == "relu/Relu_2"
    assert clean["a"] == "a"
    assert len(set(clean.values())) == len(names)
    assert all("//" not in c and not c.startswith("/") for c in clean.values())


def test_metadata_lists_every_model_output_and_clean_statistics(twohead: TestClient) -> None:
    meta = twohead.get("/v2/models/twohead").json()
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert list(outputs)[:3] == ["logits", EMBEDDING, "probabilities"]
    assert outputs[EMBEDDING] == {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, 8]}
    stats = [n for n in outputs if n.startswith("stats/")]
    layers = {n.removeprefix("stats/").rsplit("/", 1)[0] for n in stats}
    assert layers == {"relu/Relu", "block/act/Relu"}
    assert all("//" not in n for n in stats)
    assert "stats/relu/Relu/channel_activity" in outputs
    assert outputs["stats/block/act/Relu/dead_units"]["datatype"] == "INT32"


def test_infer_returns_every_model_output_by_default(
    twohead: TestClient, two_output_model_path: Path
) -> None:
    x = reference_inputs(3, seed=4)
    response = twohead.post("/v2/models/twohead/infer", json={"inputs": [json_input(x)]})
    assert response.status_code == 200, response.text
    head, arrays = split_binary(response)
    assert [o["name"] for o in head["outputs"]] == ["logits", EMBEDDING, "probabilities"]
    session = ort.InferenceSession(str(two_output_model_path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", EMBEDDING], {"input": x})
    assert np.allclose(arrays["logits"], logits, atol=1e-5)
    assert np.allclose(arrays[EMBEDDING], embedding, atol=1e-5)
    assert arrays[EMBEDDING].shape == (3, 8)


def test_infer_by_name_with_clean_statistics(
    twohead: TestClient, two_output_model_path: Path
) -> None:
    x = reference_inputs(2, seed=6)
    names = [EMBEDDING, "stats/relu/Relu/channel_activity", "stats/block/act/Relu/dead_units"]
    response = twohead.post(
        "/v2/models/twohead/infer",
        json={"inputs": [json_input(x)], "outputs": [{"name": n} for n in names]},
    )
    assert response.status_code == 200, response.text
    head, arrays = split_binary(response)
    assert [o["name"] for o in head["outputs"]] == names
    assert arrays[EMBEDDING].shape == (2, 8)
    v1 = twohead.post(
        "/v1/models/twohead/predict",
        params={"stats": "channels"},
        json={"tensor": {"data": x.tolist()}},
    ).json()["stats"]["layers"]
    by_name = {layer["name"]: layer for layer in v1}
    assert set(by_name) == set(LEGACY_LAYER_NAMES)  # v1 keeps the names of the graph
    activity = arrays["stats/relu/Relu/channel_activity"]
    assert np.allclose(activity.mean(axis=0), by_name["/relu/Relu"]["channel_activity"])
    assert (
        int(arrays["stats/block/act/Relu/dead_units"][0])
        == (by_name["/block//act/Relu"]["dead_units"])
    )
    old = twohead.post(
        "/v2/models/twohead/infer",
        json={"inputs": [json_input(x)], "outputs": [{"name": "stats//relu/Relu/active_rate"}]},
    )
    assert old.status_code == 400
    assert "stats/relu/Relu/channel_activity" in old.json()["error"]


def test_concurrent_requests_each_get_their_own_extra_output_rows(
    twohead: TestClient, two_output_model_path: Path
) -> None:
    """Merged by the batcher, split back per request: the extra output too."""
    model = twohead.app.state.plane.get_model("twohead", None)  # type: ignore[attr-defined]
    x = reference_inputs(5, seed=9)
    x = model.validate_input(x)
    results = model.run_split(x, [2, 3], ["none", "none"])
    session = ort.InferenceSession(str(two_output_model_path), providers=["CPUExecutionProvider"])
    (embedding,) = session.run([EMBEDDING], {"input": x})
    assert np.allclose(results[0].outputs[EMBEDDING], embedding[:2], atol=1e-5)
    assert np.allclose(results[1].outputs[EMBEDDING], embedding[2:], atol=1e-5)
    stats = model.run_split(x, [4, 1], ["summary", "channels"])
    assert np.allclose(stats[1].outputs[EMBEDDING], embedding[4:], atol=1e-5)


def test_one_name_per_statistic_in_v1_v2_and_docs(twohead: TestClient, model_repo: Path) -> None:
    """Every statistic of a v1 layer summary is a v2 output of the same name, and back; the
    docs and the page use those names and no other."""
    with TestClient(create_app(make_settings(model_repo))) as client:
        x = reference_inputs(1, (3, 16, 16), seed=2)
        v1 = client.post(
            "/v1/models/foreign/predict",
            params={"stats": "channels"},
            json={"tensor": {"data": x.tolist()}},
        ).json()["stats"]["layers"]
        meta = client.get("/v2/models/foreign").json()
    v1_statistics = set().union(*(layer.keys() for layer in v1)) - V1_NOT_STATISTICS - V1_ONLY
    v2_statistics = {
        o["name"].rsplit("/", 1)[1] for o in meta["outputs"] if o["name"].startswith("stats/")
    }
    assert v1_statistics == v2_statistics == STATISTICS  # foreign has a sigmoid layer
    api = (REPO_ROOT / "docs" / "api.md").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    page = (REPO_ROOT / "service" / "api" / "static" / "app.js").read_text()
    for statistic in STATISTICS:
        assert f"`{statistic}`" in api or f".../{statistic}`" in api, statistic
    assert "channel_activity" in page
    for text in (api, readme, page):
        lines = [line for line in text.splitlines() if not line.startswith("Renamed in 0.x")]
        assert not re.search(r"active[_ ]rate", "\n".join(lines)), "one name: channel activity"
