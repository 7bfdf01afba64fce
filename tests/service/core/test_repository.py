"""The model repository: discovery, latest version, typed errors, monitors per model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.core.monitor import ActivationMonitor
from service.core.repository import ModelNotFoundError, ModelRepository
from service.runtime.loaded_model import LoadedModel, ModelLoadError
from tests.service.conftest import reference_inputs


@pytest.fixture(scope="module")
def repo(model_repo: Path) -> ModelRepository:
    repository = ModelRepository(model_repo, threads=1, window=8)
    repository.load_all()
    return repository


def copy_repo(model_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    return root


def test_discovery_and_listing(repo: ModelRepository) -> None:
    assert repo.ready is True
    ready = {"state": "READY"}
    assert repo.list_models() == [
        {
            "name": "foreign",
            "versions": ["1"],
            "latest": "1",
            "default": "1",
            "pinned": None,
            "states": [{"version": "1", **ready}],
        },
        {
            "name": "tiny",
            "versions": ["1", "2"],
            "latest": "2",
            "default": "2",
            "pinned": None,
            "states": [{"version": "1", **ready}, {"version": "2", **ready}],
        },
    ]
    assert repo.available() == {"foreign": ["1"], "tiny": ["1", "2"]}


def test_not_ready_before_loading(model_repo: Path) -> None:
    repository = ModelRepository(model_repo)
    assert repository.ready is False
    with pytest.raises(ModelNotFoundError):
        repository.get("tiny")


@pytest.mark.parametrize(
    ("version", "expected"), [(None, "2"), ("latest", "2"), ("1", "1"), (2, "2")]
)
def test_version_selection(repo: ModelRepository, version, expected: str) -> None:
    model = repo.get("tiny", version)
    assert isinstance(model, LoadedModel)
    assert model.version == expected
    assert model.name == "tiny"


def test_unknown_model_lists_the_models(repo: ModelRepository) -> None:
    with pytest.raises(
        ModelNotFoundError, match="unknown model 'nope'; available models: foreign, tiny"
    ):
        repo.get("nope")


def test_unknown_version_lists_the_versions(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        repo.get("tiny", "7")
    assert str(info.value) == "model 'tiny' has no version '7'; available versions: 1, 2"
    assert isinstance(info.value, LookupError)
    assert (info.value.name, info.value.version) == ("tiny", "7")


def test_loaded_models_answer(repo: ModelRepository) -> None:
    result = repo.get("foreign").run(reference_inputs(2, (3, 16, 16)), "summary")
    assert result.probabilities.shape == (2, 5)
    assert [s["kind"] for s in result.layer_stats] == ["leaky_relu", "sigmoid"]


def test_one_monitor_per_model_bound_to_latest(repo: ModelRepository) -> None:
    monitor = repo.monitor("tiny")
    assert isinstance(monitor, ActivationMonitor)
    assert monitor is repo.monitor("tiny")
    assert monitor is not repo.monitor("foreign")
    monitor.reset()
    latest, older = repo.get("tiny"), repo.get("tiny", "1")
    x = reference_inputs(3)
    assert repo.record(older, older.run(x, "summary").per_sample_active) is False
    assert monitor.snapshot()["samples_seen"] == 0
    assert repo.record(latest, latest.run(x, "summary").per_sample_active) is True
    assert monitor.snapshot()["samples_seen"] == 3
    with pytest.raises(ModelNotFoundError):
        repo.monitor("nope")
    monitor.reset()


def test_reload_keeps_monitor_when_latest_unchanged_and_replaces_it_otherwise(
    model_repo: Path, tmp_path: Path
) -> None:
    root = copy_repo(model_repo, tmp_path)
    repository = ModelRepository(root, threads=1)
    repository.load_all()
    monitor = repository.monitor("tiny")
    first = repository.get("tiny")
    shutil.copytree(root / "tiny" / "2", root / "tiny" / "3")
    repository.load_all()
    assert repository.get("tiny").version == "3"
    assert repository.monitor("tiny") is not monitor
    # The old model object stays usable for a request that already holds it.
    assert first.run(reference_inputs(1)).logits.shape == (1, 10)


def test_broken_file_is_a_typed_error_naming_it(model_repo: Path, tmp_path: Path) -> None:
    root = copy_repo(model_repo, tmp_path)
    broken = root / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x00garbage")
    repository = ModelRepository(root, threads=1)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model") as info:
        repository.load_all()
    assert str(broken) in str(info.value)
    assert repository.ready is False

    tolerant = ModelRepository(root, threads=1, skip_broken=True)
    tolerant.load_all()
    assert tolerant.ready is True
    assert "broken" not in tolerant.available()
    assert list(tolerant.failures) == [str(broken)]


def test_odd_folders_are_ignored(model_repo: Path, tmp_path: Path) -> None:
    root = copy_repo(model_repo, tmp_path)
    (root / "tiny" / "draft").mkdir()  # not a version number
    shutil.copyfile(root / "tiny" / "1" / "model.onnx", root / "tiny" / "draft" / "model.onnx")
    (root / "tiny" / "0").mkdir()  # versions are positive
    (root / "empty" / "1").mkdir(parents=True)  # no model file
    (root / "README.txt").write_text("not a model")
    repository = ModelRepository(root, threads=1)
    assert repository.discover() == {"foreign": ["1"], "tiny": ["1", "2"]}


def test_versions_sort_numerically(model_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for version in ("2", "10", "9"):
        target = root / "tiny" / version / "model.onnx"
        target.parent.mkdir(parents=True)
        shutil.copyfile(model_repo / "tiny" / "1" / "model.onnx", target)
    repository = ModelRepository(root, threads=1)
    repository.load_all()
    assert repository.available() == {"tiny": ["2", "9", "10"]}
    assert repository.get("tiny").version == "10"
    assert repository.get("tiny", "009").version == "9"


def test_missing_root_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelRepository(tmp_path / "nowhere").load_all()


def test_empty_repository_is_ready_with_no_models(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path, threads=1)
    repository.load_all()
    assert repository.ready is True
    assert repository.list_models() == []
    with pytest.raises(ModelNotFoundError, match="available models: none"):
        repository.get("tiny")


def test_models_are_warmed_up(repo: ModelRepository) -> None:
    # warm_up fills labels of foreign models from the output when shape inference cannot.
    assert repo.get("foreign").labels == ["0", "1", "2", "3", "4"]
    assert np.isfinite(repo.get("tiny").run(np.zeros((1, 1, 8, 8), np.float32)).logits).all()
