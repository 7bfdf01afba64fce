"""``python -m service calibrate`` (service/calibrate.py): the reference profile it writes
beside a model, the repository taking it up, and the monitor without one said plainly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper

from service.calibrate import calibrate
from service.core.reference import REFERENCE_FILENAME, ReferenceFile
from service.core.repository import ModelRepository
from service.metadata import METADATA_KEY, ModelMetadata
from tests.server_helpers import REPO_ROOT, uvicorn_server
from tests.service.conftest import (
    make_onnx_cnn,
    numpy_layer_stats,
    run_with_activations,
    save_model,
)
from tests.service.http_helpers import image_bytes, tiny_preprocess

IMAGES = 12


def without_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with our metadata (preprocessing included) but no reference profile."""
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ModelMetadata.model_validate(json.loads(props[METADATA_KEY]))
    metadata.reference = None
    del model.metadata_props[:]
    helper.set_model_props(model, {METADATA_KEY: metadata.to_json()})
    return model


@pytest.fixture
def repo(tmp_path: Path, foreign_model_path: Path) -> Path:
    """``plain/1``: a tiny model with preprocessing and no reference profile; ``foreign/1``:
    no metadata at all."""
    root = tmp_path / "models"
    model = without_reference(make_onnx_cnn(name="plain", seed=11))
    save_model(model, root / "plain" / "1" / "model.onnx")
    (root / "foreign" / "1").mkdir(parents=True)
    shutil.copyfile(foreign_model_path, root / "foreign" / "1" / "model.onnx")
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """``IMAGES`` real 8x8 grayscale PNG files, and a text file the command skips."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(IMAGES):
        (folder / f"{i:02d}.png").write_bytes(image_bytes(seed=100 + i))
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m service calibrate ARGS`` in the repository's root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELU_SERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", "calibrate", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_calibrate_writes_the_profile_numpy_measures(repo: Path, images: Path) -> None:
    done = run_calibrate("plain", "--images", str(images), "--model-root", str(repo))
    assert done.returncode == 0, done.stderr
    target = repo / "plain" / "1" / REFERENCE_FILENAME
    assert f"model plain version 1: {IMAGES} images, 2 activation layers" in done.stdout
    assert f"wrote {target}" in done.stdout
    assert "notes.txt: not an image" in done.stderr
    stored = ReferenceFile.model_validate_json(target.read_text())
    assert (stored.model, stored.version, stored.reference.samples) == ("plain", "1", IMAGES)

    # The oracle: the raw activations of the same images, preprocessed independently.
    model = onnx.load(str(repo / "plain" / "1" / "model.onnx"))
    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    assert metadata is not None
    files = sorted(images.glob("*.png"))
    x = np.concatenate([tiny_preprocess(f.read_bytes()) for f in files])  # (12, 1, 8, 8)
    raw = run_with_activations(model, x, [layer.tensor for layer in metadata.activations])
    assert list(stored.reference.layers) == [layer.name for layer in metadata.activations]
    for layer in metadata.activations:
        want = numpy_layer_stats(raw[layer.tensor], layer.kind)
        got = stored.reference.layers[layer.name]
        np.testing.assert_allclose(got.channel_activity, want["channel_activity"], atol=1e-6)
        assert got.inactive_fraction == pytest.approx(want["inactive_fraction"], abs=1e-6)
        assert got.dead_units == want["dead_units"]
        assert got.mean == pytest.approx(want["mean"], rel=1e-4, abs=1e-6)
        assert got.std == pytest.approx(want["std"], rel=1e-4, abs=1e-6)
        assert got.saturated_fraction is None  # ReLU layers


def test_calibrate_limit_and_version(repo: Path, images: Path) -> None:
    target, data, _ = calibrate("plain", images, version="1", root=repo, limit=5)
    assert data.reference.samples == 5
    assert target == repo / "plain" / "1" / REFERENCE_FILENAME
    done = run_calibrate("plain", "--images", str(images), "--model-root", str(repo),
                         "--version", "7")  # fmt: skip
    assert done.returncode == 1
    assert "model 'plain' has no version '7'; available versions: 1" in done.stderr


def test_calibrate_refuses_a_model_without_preprocessing(repo: Path, images: Path) -> None:
    done = run_calibrate("foreign", "--images", str(images), "--model-root", str(repo))
    assert done.returncode == 1
    assert "model 'foreign' version 1 has no preprocessing" in done.stderr
    assert not (repo / "foreign" / "1" / REFERENCE_FILENAME).exists()
    unknown = run_calibrate("nope", "--images", str(images), "--model-root", str(repo))
    assert unknown.returncode == 1
    assert "unknown model 'nope'" in unknown.stderr
    assert "foreign, plain" in unknown.stderr


def test_repository_takes_reference_json_and_follows_it(repo: Path, images: Path) -> None:
    repository = ModelRepository(repo)
    repository.load_all()
    before = repository.get("plain")
    assert before.reference is None
    assert before.reference_source is None
    assert not repository.monitor("plain").has_reference
    fingerprint = repository.fingerprint()

    target, data, _ = calibrate("plain", images, root=repo)
    assert repository.fingerprint() != fingerprint  # the poller sees the new file
    assert repository.sync()["loaded"] == ["plain/1"]
    after = repository.get("plain")
    assert after.reference == data.reference
    assert after.reference_source == "reference.json"
    assert repository.monitor("plain").has_reference
    assert repository.sync()["loaded"] == []  # nothing changed: kept as is

    # Measured on other bytes: stale, ignored (the embedded profile, none here, serves).
    target.write_text(data.model_copy(update={"sha256": "0" * 64}).model_dump_json())
    assert repository.sync()["loaded"] == ["plain/1"]
    assert repository.get("plain").reference is None
    # Not a reference file: the version fails, the copy loaded keeps serving.
    target.write_text('{"format": 1}')
    changes = repository.sync()
    assert changes["failed"] == ["plain/1"]
    assert "is not a valid reference file" in repository.failures[str(target.parent / "model.onnx")]
    target.unlink()
    assert repository.sync()["loaded"] == ["plain/1"]
    assert repository.failures == {}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def drift_lines(metrics: str, model: str) -> list[str]:
    return [
        line
        for line in metrics.splitlines()
        if line.startswith("relu_serve_activation_drift_score{") and f'model="{model}"' in line
    ]


def test_a_running_service_measures_drift_once_calibrated(repo: Path, images: Path) -> None:
    env = {"RELU_SERVE_REPOSITORY_POLL_S": "0.2", "RELU_SERVE_MONITOR_MIN_SAMPLES": "4"}
    files = [("file", (f.name, f.read_bytes(), "image/png")) for f in sorted(images.glob("*.png"))]
    with uvicorn_server(repo, env=env) as (url, _):
        activations = f"{url}/v1/models/plain/activations"
        predict = f"{url}/v1/models/plain/predict"
        assert httpx.post(predict, params={"stats": "summary"}, files=files[:4]).status_code == 200
        snapshot = httpx.get(activations).json()
        assert snapshot["has_reference"] is False
        assert snapshot["drift"] is None
        assert "no reference profile" in snapshot["drift_unavailable"]
        assert "python -m service calibrate plain --version 1" in snapshot["drift_unavailable"]
        metrics = httpx.get(f"{url}/metrics").text
        assert drift_lines(metrics, "plain") == []  # no NaN sample: none at all
        assert 'relu_serve_monitor_has_reference{model="plain"} 0.0' in metrics

        done = run_calibrate("plain", "--images", str(images), "--model-root", str(repo))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: httpx.get(activations).json()["has_reference"], 20, "the reload")
        response = httpx.post(predict, params={"stats": "summary"}, files=files)
        assert response.status_code == 200, response.text
        snapshot = httpx.get(activations).json()
        assert snapshot["drift_unavailable"] is None
        assert isinstance(snapshot["drift"], float)
        assert 0.0 <= snapshot["drift"] <= 1.0
        # The same images as the profile: (nearly) no drift.
        assert snapshot["drift"] < 0.05
        info = httpx.get(f"{url}/v1/models/plain").json()
        assert info["reference_source"] == "reference.json"
        metrics = httpx.get(f"{url}/metrics").text
        lines = drift_lines(metrics, "plain")
        assert len(lines) == 2
        assert all(math.isfinite(float(line.rsplit(" ", 1)[1])) for line in lines)
        assert 'relu_serve_monitor_has_reference{model="plain"} 1.0' in metrics
