"""The live activation monitor: rolling window, dead units once the window is full, drift."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from service.core.monitor import ActivationMonitor
from service.runtime.activations import ActivationNode
from service.runtime.loaded_model import LoadedModel
from tests.service.conftest import reference_inputs


def layer(name: str, channels: int) -> ActivationNode:
    return ActivationNode(name, "relu", "Relu", f"{name}_out", channels, 4)


@pytest.fixture(scope="module")
def tiny(tiny_cnn_path: Path) -> LoadedModel:
    return LoadedModel.load(tiny_cnn_path, "tiny", "1")


def feed(monitor: ActivationMonitor, model: LoadedModel, x: np.ndarray, batch: int = 16) -> None:
    for start in range(0, len(x), batch):
        monitor.update(model.run(x[start : start + batch], "summary").per_sample_active)


def by_name(snapshot: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in snapshot["layers"]}


def test_rolling_window_matches_the_last_samples() -> None:
    rng = np.random.default_rng(0)
    monitor = ActivationMonitor([layer("a", 3)], None, window=10)
    history = np.zeros((0, 3))
    for size in (4, 4, 4, 25, 3, 9, 10, 1):
        rows = rng.random((size, 3)).astype(np.float32)
        monitor.update({"a": rows})
        history = np.concatenate([history, rows])
        kept = history[-10:]
        entry = by_name(monitor.snapshot())["a"]
        np.testing.assert_allclose(entry["channel_activity"], kept.mean(axis=0), rtol=1e-6)
        assert entry["inactive_fraction"] == pytest.approx(1 - kept.mean(), rel=1e-6)
        assert entry["samples_seen"] == len(history)
        assert entry["samples"] == len(kept)
        assert entry["window_full"] == (len(history) >= 10)


def test_dead_channel_reported_only_once_the_window_is_full(
    dead_channel_model_path: Path,
) -> None:
    model = LoadedModel.load(dead_channel_model_path, "dead", "1")
    monitor = ActivationMonitor(model.layers, model.reference, window=20)
    x = reference_inputs(30, seed=21)
    feed(monitor, model, x[:15], batch=5)
    first = by_name(monitor.snapshot())["features.0.act"]
    assert first["window_full"] is False
    assert first["channel_activity"][0] == 0.0  # already silent, but not yet called dead
    assert first["dead_units"] is None
    assert first["dead_channels"] is None
    feed(monitor, model, x[15:], batch=5)
    first = by_name(monitor.snapshot())["features.0.act"]
    assert first["window_full"] is True
    assert first["dead_units"] == 1
    assert first["dead_channels"] == [0]


def test_a_channel_that_wakes_up_is_no_longer_dead() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, window=4)
    monitor.update({"a": np.array([[0.0, 0.5]] * 4, np.float32)})
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == [0]
    monitor.update({"a": np.array([[0.25, 0.5]], np.float32)})
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == []


def test_drift_stays_low_in_distribution_and_rises_on_inverted_images(
    tiny: LoadedModel,
) -> None:
    same = ActivationMonitor(tiny.layers, tiny.reference, window=64)
    feed(same, tiny, reference_inputs(64, seed=77))
    snapshot = same.snapshot()
    assert snapshot["has_reference"] is True
    assert snapshot["window_full"] is True
    assert snapshot["drift"] < snapshot["drift_threshold"]
    assert snapshot["drifted"] is False

    inverted = ActivationMonitor(tiny.layers, tiny.reference, window=64)
    feed(inverted, tiny, reference_inputs(64, seed=77, inverted=True))
    snapshot = inverted.snapshot()
    assert snapshot["drift"] > snapshot["drift_threshold"]
    assert snapshot["drifted"] is True
    assert snapshot["drift"] == max(entry["drift"] for entry in snapshot["layers"])


def test_drift_is_mean_absolute_rate_difference() -> None:
    from service.metadata import LayerProfile, ReferenceProfile

    reference = ReferenceProfile(
        samples=10,
        layers={
            "a": LayerProfile(inactive_fraction=0.5, channel_activity=[0.5, 0.5], dead_units=0)
        },
    )
    monitor = ActivationMonitor([layer("a", 2)], reference, window=2, drift_threshold=0.3)
    monitor.update({"a": np.array([[1.0, 0.5], [1.0, 0.3]], np.float32)})
    entry = by_name(monitor.snapshot())["a"]
    # |1.0 - 0.5| and |0.4 - 0.5|: mean 0.3, not above the threshold
    assert entry["drift"] == pytest.approx(0.3)
    assert entry["drifted"] is False
    assert entry["reference_inactive_fraction"] == 0.5


def test_drift_is_not_claimed_before_the_window_is_full(tiny: LoadedModel) -> None:
    monitor = ActivationMonitor(tiny.layers, tiny.reference, window=64)
    feed(monitor, tiny, reference_inputs(8, seed=1, inverted=True))
    snapshot = monitor.snapshot()
    assert snapshot["drift"] > snapshot["drift_threshold"]  # measured...
    assert snapshot["drifted"] is False  # ...but 8 samples are not a verdict


def test_reset_clears_everything(tiny: LoadedModel) -> None:
    monitor = ActivationMonitor(tiny.layers, tiny.reference, window=4)
    feed(monitor, tiny, reference_inputs(8))
    assert monitor.snapshot()["samples_seen"] == 8
    monitor.reset()
    snapshot = monitor.snapshot()
    assert snapshot["samples_seen"] == 0
    assert snapshot["samples"] == 0
    assert snapshot["drift"] is None
    for entry in snapshot["layers"]:
        assert entry["inactive_fraction"] is None
        assert entry["dead_units"] is None


def test_without_reference_there_is_no_drift() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, window=1)
    monitor.update({"a": np.ones((3, 2), np.float32)})
    snapshot = monitor.snapshot()
    assert snapshot["drift"] is None
    assert snapshot["drifted"] is False
    assert snapshot["has_reference"] is False


def test_bad_updates_and_settings() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, window=3)
    with pytest.raises(ValueError, match=r"expected \(N, 2\) active rates, got shape \(3, 4\)"):
        monitor.update({"a": np.zeros((3, 4))})
    monitor.update({"unknown": np.zeros((3, 4))})  # other layers are ignored
    assert monitor.snapshot()["samples_seen"] == 0
    two = ActivationMonitor([layer("a", 2), layer("b", 1)], None, window=3)
    with pytest.raises(ValueError, match=r"missing for layers \['b'\]"):
        two.update({"a": np.zeros((3, 2))})  # every layer of a batch, or none
    with pytest.raises(ValueError, match="same rows in every layer"):
        two.update({"a": np.zeros((3, 2)), "b": np.zeros((2, 1))})
    assert two.snapshot()["samples_seen"] == 0  # nothing half-added
    with pytest.raises(ValueError, match="at least 1 sample"):
        ActivationMonitor([], None, window=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ActivationMonitor([], None, window=3, drift_threshold=0)


def test_concurrent_updates_are_all_counted() -> None:
    monitor = ActivationMonitor([layer("a", 4), layer("b", 2)], None, window=50)
    rows = {"a": np.ones((3, 4), np.float32), "b": np.zeros((3, 2), np.float32)}

    def worker() -> None:
        for _ in range(200):
            monitor.update(rows)
            monitor.snapshot()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = monitor.snapshot()
    assert snapshot["samples_seen"] == 4 * 200 * 3
    entries = by_name(snapshot)
    assert entries["a"]["channel_activity"] == [1.0] * 4
    assert entries["b"]["dead_channels"] == [0, 1]
