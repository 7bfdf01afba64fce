"""The live activation monitor: time window of buckets, dead units and drift once it holds
enough samples, exact merge of several workers' stores, reset across them, Prometheus families."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.core import Metric

from service.core import monitor as monitor_module
from service.core.monitor import ACTIVITY_SCALE, ActivationMonitor, collect_metrics, count_batch
from service.metadata import LayerProfile, ReferenceProfile
from service.runtime.activations import ActivationNode
from service.runtime.loaded_model import LoadedModel
from service.runtime.summaries import LayerActivity
from tests.service.conftest import reference_inputs


def layer(name: str, channels: int) -> ActivationNode:
    return ActivationNode(name, "relu", "Relu", f"{name}_out", channels, 4)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tiny(tiny_cnn_path: Path) -> LoadedModel:
    return LoadedModel.load(tiny_cnn_path, "tiny", "1")


def feed(monitor: ActivationMonitor, model: LoadedModel, x: np.ndarray, batch: int = 16) -> None:
    for start in range(0, len(x), batch):
        monitor.update(model.run(x[start : start + batch], "summary").per_sample_active)


def by_name(snapshot: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in snapshot["layers"]}


def rates(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """(n, channels) active rates k/64, as a layer with 64 positions gives, some zero."""
    return (rng.integers(0, 65, (n, channels)) * (rng.random((n, channels)) < 0.7) / 64).astype(
        np.float32
    )


def shared(
    folder: Path, layers: list[ActivationNode], worker: str, clock: FakeClock, **options: object
) -> ActivationMonitor:
    """One worker's monitor of model "m" version 1 in ``folder``."""
    return ActivationMonitor(
        layers,
        None,
        shared_dir=folder,
        model="m",
        sha256="ab" * 32,
        worker=worker,
        clock=clock,
        **options,
    )


def test_window_holds_the_last_buckets_of_samples() -> None:
    rng = np.random.default_rng(0)
    clock = FakeClock()
    monitor = ActivationMonitor(
        [layer("a", 3)], None, min_samples=10, window_s=30, bucket_s=10, clock=clock
    )
    history: list[tuple[float, np.ndarray]] = []
    for size, step in ((4, 0), (4, 3), (4, 9), (25, 12), (3, 10), (9, 25), (10, 4), (1, 40)):
        clock.now += step
        rows = rates(rng, size, 3)
        monitor.update({"a": rows})
        history.append((clock.now, rows))
        bucket = clock.now // 10
        kept = np.concatenate([r for t, r in history if t // 10 > bucket - 3])  # 3 buckets
        entry = by_name(monitor.snapshot())["a"]
        expected = kept.mean(axis=0, dtype=np.float64)
        np.testing.assert_allclose(entry["channel_activity"], expected, rtol=1e-12)
        assert entry["inactive_fraction"] == pytest.approx(1 - expected.mean(), rel=1e-12)
        assert entry["samples_seen"] == sum(len(r) for _, r in history)
        assert entry["samples"] == len(kept)
        assert entry["window_full"] == (len(kept) >= 10)
    snapshot = monitor.snapshot()
    assert (snapshot["window_s"], snapshot["bucket_s"], snapshot["min_samples"]) == (30, 10, 10)
    clock.now += 30  # every bucket has aged out; samples_seen stays
    snapshot = monitor.snapshot()
    assert snapshot["samples"] == 0
    assert snapshot["samples_seen"] == sum(len(r) for _, r in history)
    assert by_name(snapshot)["a"]["inactive_fraction"] is None


def test_activity_is_kept_in_fixed_point_exactly_for_rates_k_over_2_to_the_j() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, min_samples=1)
    monitor.update({"a": np.array([[1 / 3, 0.25], [2**-30, 0.75]], np.float32)})
    activity = by_name(monitor.snapshot())["a"]["channel_activity"]
    assert activity[1] == 0.5  # quarters are exact
    # Each rate is rounded down to 2**-24: 1/3 loses under 6e-8, 2**-30 all of it.
    assert activity[0] == pytest.approx(1 / 6, abs=1 / ACTIVITY_SCALE)


def test_dead_channel_reported_only_once_the_window_holds_min_samples(
    dead_channel_model_path: Path,
) -> None:
    model = LoadedModel.load(dead_channel_model_path, "dead", "1")
    monitor = ActivationMonitor(model.layers, model.reference, min_samples=20)
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
    monitor = ActivationMonitor([layer("a", 2)], None, min_samples=4)
    monitor.update({"a": np.array([[0.0, 0.5]] * 4, np.float32)})
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == [0]
    monitor.update({"a": np.array([[0.25, 0.5]], np.float32)})
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == []


def test_a_dead_channel_is_dead_again_once_its_activity_ages_out() -> None:
    clock = FakeClock()
    monitor = ActivationMonitor(
        [layer("a", 2)], None, min_samples=4, window_s=20, bucket_s=10, clock=clock
    )
    monitor.update({"a": np.array([[0.25, 0.5]], np.float32)})
    clock.now += 10
    monitor.update({"a": np.array([[0.0, 0.5]] * 4, np.float32)})
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == []
    clock.now += 10  # the first bucket leaves the window
    assert by_name(monitor.snapshot())["a"]["dead_channels"] == [0]


def test_drift_stays_low_in_distribution_and_rises_on_inverted_images(
    tiny: LoadedModel,
) -> None:
    same = ActivationMonitor(tiny.layers, tiny.reference, min_samples=64)
    feed(same, tiny, reference_inputs(64, seed=77))
    snapshot = same.snapshot()
    assert snapshot["has_reference"] is True
    assert snapshot["window_full"] is True
    assert snapshot["drift"] < snapshot["drift_threshold"]
    assert snapshot["drifted"] is False

    inverted = ActivationMonitor(tiny.layers, tiny.reference, min_samples=64)
    feed(inverted, tiny, reference_inputs(64, seed=77, inverted=True))
    snapshot = inverted.snapshot()
    assert snapshot["drift"] > snapshot["drift_threshold"]
    assert snapshot["drifted"] is True
    assert snapshot["drift"] == max(entry["drift"] for entry in snapshot["layers"])


def test_drift_is_mean_absolute_rate_difference() -> None:
    reference = ReferenceProfile(
        samples=10,
        layers={
            "a": LayerProfile(inactive_fraction=0.5, channel_activity=[0.5, 0.5], dead_units=0)
        },
    )
    monitor = ActivationMonitor([layer("a", 2)], reference, min_samples=2, drift_threshold=0.3)
    monitor.update({"a": np.array([[1.0, 0.5], [1.0, 0.25]], np.float32)})
    entry = by_name(monitor.snapshot())["a"]
    # |1.0 - 0.5| and |0.375 - 0.5|: mean 0.3125, above the threshold
    assert entry["drift"] == 0.3125
    assert entry["drifted"] is True
    assert entry["reference_inactive_fraction"] == 0.5


def test_drift_is_not_claimed_before_min_samples(tiny: LoadedModel) -> None:
    monitor = ActivationMonitor(tiny.layers, tiny.reference, min_samples=64)
    feed(monitor, tiny, reference_inputs(8, seed=1, inverted=True))
    snapshot = monitor.snapshot()
    assert snapshot["drift"] > snapshot["drift_threshold"]  # measured...
    assert snapshot["drifted"] is False  # ...but 8 samples are not a verdict


def test_reset_empties_the_window_and_keeps_the_totals(tiny: LoadedModel) -> None:
    monitor = ActivationMonitor(tiny.layers, tiny.reference, min_samples=4)
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
    assert value(collect_metrics([monitor]), "relu_serve_monitor_samples_total") == 8


def test_without_reference_there_is_no_drift() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, min_samples=1)
    monitor.update({"a": np.ones((3, 2), np.float32)})
    snapshot = monitor.snapshot()
    assert snapshot["drift"] is None
    assert snapshot["drifted"] is False
    assert snapshot["has_reference"] is False


def test_bad_updates_and_settings() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, min_samples=3)
    with pytest.raises(ValueError, match=r"expected \(N, 2\) active rates, got shape \(3, 4\)"):
        monitor.update({"a": np.zeros((3, 4))})
    monitor.update({"unknown": np.zeros((3, 4))})  # other layers are ignored
    assert monitor.snapshot()["samples_seen"] == 0
    two = ActivationMonitor([layer("a", 2), layer("b", 1)], None, min_samples=3)
    with pytest.raises(ValueError, match=r"missing for layers \['b'\]"):
        two.update({"a": np.zeros((3, 2))})  # every layer of a batch, or none
    with pytest.raises(ValueError, match="same rows in every layer"):
        two.update({"a": np.zeros((3, 2)), "b": np.zeros((2, 1))})
    assert two.snapshot()["samples_seen"] == 0  # nothing half-added
    with pytest.raises(ValueError, match="at least 1 sample"):
        ActivationMonitor([], None, min_samples=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ActivationMonitor([], None, drift_threshold=0)
    with pytest.raises(ValueError, match=r"whole number of buckets of 7 s, e.g. 301 s"):
        ActivationMonitor([], None, window_s=300, bucket_s=7)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_that_are_not_finite_are_never_counted(packed: bool) -> None:
    # A NaN cast to an integer count is undefined (on x86-64: -2**63, for good): rows with a
    # NaN or an infinity anywhere are left out, the finite rows of the batch still count.
    reference = ReferenceProfile(
        samples=10,
        layers={
            "a": LayerProfile(inactive_fraction=0.5, channel_activity=[0.5, 0.5], dead_units=0),
            "b": LayerProfile(inactive_fraction=0.5, channel_activity=[0.5], dead_units=0),
        },
    )
    monitor = ActivationMonitor(
        [layer("a", 2), layer("b", 1)], reference, min_samples=2, drift_threshold=0.3
    )
    a = np.array([[0.5, 0.25], [np.nan, 0.5], [0.25, np.inf], [1.0, 0.0], [0.75, 0.5]], np.float32)
    b = np.array([[1.0], [1.0], [0.0], [np.nan], [0.0]], np.float32)

    def update(rows: slice) -> None:
        if packed:  # as the data plane feeds it: one block, the monitor's column order
            block = np.concatenate([a[rows], b[rows]], axis=1)
            monitor.update(LayerActivity(block, {"a": slice(0, 2), "b": slice(2, 3)}))
        else:
            monitor.update({"a": a[rows], "b": b[rows]})

    update(slice(0, 4))  # rows 0 (finite) and 1-3 (not)
    update(slice(1, 2))  # one row: count_batch's short path
    update(slice(3, 5))  # rows 3 (not) and 4 (finite)
    snapshot = monitor.snapshot()
    assert snapshot["samples"] == snapshot["samples_seen"] == 2
    layers = by_name(snapshot)
    assert layers["a"]["channel_activity"] == [0.625, 0.375]
    assert layers["b"]["channel_activity"] == [0.5]
    assert layers["a"]["inactive_fraction"] == 0.5
    assert layers["b"]["dead_units"] == 0
    assert layers["a"]["drift"] == 0.125
    assert snapshot["drifted"] is False
    for family in collect_metrics([monitor]):
        for sample in family.samples:
            assert 0 <= sample.value < np.inf, sample


def test_concurrent_updates_are_all_counted() -> None:
    monitor = ActivationMonitor([layer("a", 4), layer("b", 2)], None, min_samples=50)
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


# ---------------------------------------------------------------- several workers


def test_two_workers_add_up_exactly_to_one_process(tmp_path: Path) -> None:
    """Two stores fed halves of the batches (in any order) merge to one store fed them all."""
    rng = np.random.default_rng(5)
    layers = [layer("a", 5), layer("b", 3)]
    batches = [{"a": rates(rng, n, 5), "b": rates(rng, n, 3)} for n in (1, 7, 16, 3, 64, 2, 9)]
    batches.append({"a": np.zeros((4, 5), np.float32), "b": rates(rng, 4, 3)})
    clock = FakeClock()
    one = shared(tmp_path / "one", layers, "1", clock, min_samples=8)
    first = shared(tmp_path / "two", layers, "1", clock, min_samples=8)
    second = shared(tmp_path / "two", layers, "2", clock, min_samples=8)
    for i, batch in enumerate(batches):
        one.update(batch)
        (first if i % 3 else second).update(batch)
        clock.now += 4  # across bucket boundaries
    alone = one.snapshot()
    for merged in (first.snapshot(), second.snapshot()):  # whichever worker answers
        assert merged["workers"] == 2
        assert alone["workers"] == 1
        assert {**merged, "workers": 1} == alone  # every number, exactly
    assert alone["samples"] == sum(len(b["a"]) for b in batches)
    assert by_name(alone)["a"]["dead_channels"] == []
    assert by_name(alone)["a"]["channel_activity"] == pytest.approx(
        np.concatenate([b["a"] for b in batches]).mean(axis=0, dtype=np.float64).tolist(), abs=1e-12
    )
    assert samples_of(collect_metrics([one])) == samples_of(collect_metrics([first]))


def test_buckets_of_every_worker_age_out(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    layers = [layer("a", 2)]
    first = shared(tmp_path, layers, "1", clock, window_s=30, bucket_s=10, min_samples=1)
    second = shared(tmp_path, layers, "2", clock, window_s=30, bucket_s=10, min_samples=1)
    first.update({"a": np.full((2, 2), 0.5, np.float32)})  # bucket 0
    clock.now = 15
    second.update({"a": np.ones((3, 2), np.float32)})  # bucket 1
    assert first.snapshot()["samples"] == 5
    clock.now = 29.9  # bucket 2: 0, 1 and 2 are in the window
    assert first.snapshot()["samples"] == 5
    clock.now = 30  # bucket 3: bucket 0 has left
    snapshot = second.snapshot()
    assert snapshot["samples"] == 3
    assert by_name(snapshot)["a"]["channel_activity"] == [1.0, 1.0]
    clock.now = 40
    assert second.snapshot()["samples"] == 0
    assert second.snapshot()["samples_seen"] == 5
    # The ring came round: bucket 3 reuses bucket 0's slot without its old counts.
    first.update({"a": np.zeros((1, 2), np.float32)})
    assert by_name(first.snapshot())["a"]["dead_channels"] == [0, 1]


def test_reset_from_one_worker_empties_every_window_and_keeps_totals(tmp_path: Path) -> None:
    clock = FakeClock()
    layers = [layer("a", 2)]
    first = shared(tmp_path, layers, "1", clock, min_samples=1)
    second = shared(tmp_path, layers, "2", clock, min_samples=1)
    first.update({"a": np.ones((2, 2), np.float32)})
    second.update({"a": np.ones((3, 2), np.float32)})
    second.reset()
    for snapshot in (first.snapshot(), second.snapshot()):
        assert (snapshot["samples"], snapshot["samples_seen"]) == (0, 0)
    # The first worker's next update starts its window afresh: its 2 old samples stay out.
    first.update({"a": np.array([[0.0, 0.5]], np.float32)})
    snapshot = second.snapshot()
    assert (snapshot["samples"], snapshot["samples_seen"]) == (1, 1)
    assert by_name(snapshot)["a"]["channel_activity"] == [0.0, 0.5]
    families = collect_metrics([second])
    assert value(families, "relu_serve_monitor_samples_total") == 6  # totals never reset
    active = "relu_serve_activation_channel_active_samples_total"
    assert value(families, active, channel="0") == 5
    assert value(families, active, channel="1") == 6


def test_other_versions_and_files_are_not_mixed_in(tmp_path: Path) -> None:
    clock = FakeClock()
    layers = [layer("a", 2)]
    ours = shared(tmp_path, layers, "1", clock)
    kwargs = {"shared_dir": tmp_path, "model": "m", "worker": "2", "clock": clock}
    other_version = ActivationMonitor(layers, None, version="2", sha256="ab" * 32, **kwargs)
    other_file = ActivationMonitor(layers, None, sha256="cd" * 32, **kwargs)
    other_layers = ActivationMonitor([layer("a", 3)], None, sha256="ab" * 32, **kwargs)
    other_model = shared(tmp_path / "x", layers, "2", clock)
    for monitor in (other_version, other_file, other_model):
        monitor.update({"a": np.ones((5, 2), np.float32)})
    other_layers.update({"a": np.ones((5, 3), np.float32)})
    ours.update({"a": np.zeros((1, 2), np.float32)})
    snapshot = ours.snapshot()
    assert (snapshot["samples"], snapshot["workers"]) == (1, 1)
    assert len(list((tmp_path / "monitor" / "m").glob("*.counts"))) == 4


def test_a_reader_waits_for_a_batch_being_written_and_skips_a_dead_writer() -> None:
    monitor = ActivationMonitor([layer("a", 2)], None, min_samples=1)
    store = monitor._store
    monitor.update({"a": np.ones((1, 2), np.float32)})
    store.header[4] += 1  # sequence number odd: a writer is half-way through a batch
    store.slot_samples[:] += 10  # ...its samples are in, its channel counts not yet
    answers: list[dict] = []
    reader = threading.Thread(target=lambda: answers.append(monitor.snapshot()))
    reader.start()
    time.sleep(0.02)
    assert not answers  # the reader waits rather than read a torn batch
    store.active[:] += 10
    store.activity[:] += 10 * ACTIVITY_SCALE
    store.header[4] += 1  # even: the batch is complete
    reader.join(5)
    assert answers[0]["samples"] == 11
    assert by_name(answers[0])["a"]["channel_activity"] == [1.0, 1.0]
    # A writer that died mid-batch leaves the number odd: read as is after a short wait.
    store.header[4] += 1
    started = time.monotonic()
    assert monitor.snapshot()["samples"] == 11
    assert monitor_module._STUCK_S <= time.monotonic() - started < 5
    started = time.monotonic()
    assert monitor.snapshot()["samples"] == 11  # known dead: no wait the second time
    assert time.monotonic() - started < monitor_module._STUCK_S


def _worker_feeds(folder: Path, worker: str, seed: int, parts: int, part: int) -> None:
    """In a child process: feed this worker's share of the seeded batches."""
    rng = np.random.default_rng(seed)
    batches = [rates(rng, n, 6) for n in rng.integers(1, 20, 40)]
    monitor = shared(folder, [layer("a", 6)], worker, FakeClock(), min_samples=1)
    for i, batch in enumerate(batches):
        if i % parts == part:
            monitor.update({"a": batch})


@pytest.mark.slow
def test_two_processes_add_up_to_one(tmp_path: Path) -> None:
    """Two worker processes write one shared folder; any process reads the sum of both."""
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_worker_feeds, args=(tmp_path / "two", str(i), 9, 2, i))
        for i in range(2)
    ]
    for child in children:
        child.start()
    _worker_feeds(tmp_path / "one", "0", 9, 1, 0)
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    clock = FakeClock()
    both = shared(tmp_path / "two", [layer("a", 6)], "reader", clock, min_samples=1).snapshot()
    alone = shared(tmp_path / "one", [layer("a", 6)], "reader", clock, min_samples=1).snapshot()
    assert both["workers"] == 3  # two writers and the reader's own empty store
    assert {**both, "workers": 0} == {**alone, "workers": 0}
    assert alone["samples"] > 0


# ---------------------------------------------------------------- Prometheus


def value(families: list[Metric], name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def samples_of(families: list[Metric]) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in families for s in f.samples]


def test_prometheus_families_hold_the_merged_view_and_the_totals() -> None:
    clock = FakeClock()
    monitor = ActivationMonitor(
        [layer("a", 2), layer("b", 1)],
        None,
        min_samples=3,
        model="m",
        version="4",
        window_s=20,
        bucket_s=10,
        clock=clock,
    )
    families = collect_metrics([monitor])
    # Nothing measured yet: no sample for what is unknown (never NaN), and an empty window.
    unknown = ("inactive_fraction", "dead_units", "drift_score")
    assert not [s for f in families for s in f.samples if s.name.endswith(unknown)]
    assert not [s for f in families for s in f.samples if math.isnan(s.value)]
    assert value(families, "relu_serve_monitor_window_samples", model="m") == 0
    monitor.update({"a": np.array([[0.5, 0.0]] * 2, np.float32), "b": np.ones((2, 1), np.float32)})
    clock.now += 20  # out of the window, still in the totals
    monitor.update({"a": np.array([[0.25, 0.0]] * 4, np.float32), "b": np.ones((4, 1), np.float32)})
    families = collect_metrics([monitor])
    gauge = {"model": "m", "layer": "a"}
    assert value(families, "relu_serve_activation_inactive_fraction", **gauge) == 0.875
    assert value(families, "relu_serve_activation_dead_units", **gauge) == 1
    # No reference: no drift sample at all (not NaN), and a 0 that says why.
    assert not [s for f in families for s in f.samples if s.name.endswith("drift_score")]
    assert value(families, "relu_serve_monitor_has_reference", model="m") == 0
    assert value(families, "relu_serve_activation_drifted", **gauge) == 0
    assert value(families, "relu_serve_monitor_window_samples", model="m") == 4
    assert value(families, "relu_serve_monitor_samples_total", model="m", version="4") == 6
    channel = {"model": "m", "version": "4", "layer": "a"}
    active = "relu_serve_activation_channel_active_samples_total"
    assert value(families, active, **channel, channel="0") == 6
    assert value(families, active, **channel, channel="1") == 0
    activity = "relu_serve_activation_channel_activity_total"
    assert value(families, activity, **channel, channel="0") == 2.0
    assert value(families, activity, model="m", layer="b", channel="0") == 6.0
    kinds = {family.name: family.type for family in families}
    assert kinds["relu_serve_monitor_samples"] == "counter"
    assert kinds["relu_serve_activation_dead_units"] == "gauge"


def test_one_row_counts_as_the_rows_of_a_batch() -> None:
    # A request of one sample takes count_batch's short path: it must count exactly as the
    # batch path does, edges included (0, the smallest unit, just under 1, 1).
    rng = np.random.default_rng(3)
    row = rng.random((1, 300), dtype=np.float32)
    row[0, :4] = [0.0, 1.0 / ACTIVITY_SCALE, np.nextafter(np.float32(1), np.float32(0)), 1.0]
    row[0, rng.random(300) < 0.3] = 0.0
    one_active, one_activity = count_batch(row)
    batch_active, batch_activity = count_batch(np.repeat(row, 3, axis=0))
    assert one_active.dtype == one_activity.dtype == np.int64
    np.testing.assert_array_equal(3 * one_active, batch_active)
    np.testing.assert_array_equal(3 * one_activity, batch_activity)
