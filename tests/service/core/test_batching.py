"""Dynamic batching (service/core/batching.py) through the data plane, with asyncio and the tiny
fixture model: merging, routing, plain vs statistics runs, the idle case, the queue limit,
and failure isolation. Timing is not asserted beyond generous bounds: speed is measured by
bench/run.py, these tests check the mechanism."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.dataplane import DataPlane
from service.core.errors import ServiceUnavailableError, UnprocessableError
from service.core.metrics import ServiceMetrics
from service.runtime.loaded_model import LoadedModel, ModelInputError
from tests.service.conftest import reference_inputs
from tests.service.http_helpers import make_settings


class RunRecorder:
    """Wraps ``LoadedModel.run_batch`` and ``split_outputs``: records each run's request
    sizes and statistics levels and the thread that ran it, and holds the first run until
    ``release`` so that others queue behind it."""

    def __init__(self, model: LoadedModel, monkeypatch: pytest.MonkeyPatch, hold: bool = True):
        self.calls: list[tuple[list[int], list[str]]] = []
        self.threads: list[int] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        real_run, real_split = model.run_batch, model.split_outputs

        def run_batch(x: np.ndarray, stats: str) -> Any:
            self.threads.append(threading.get_ident())
            self.started.set()
            assert self.gate.wait(10)
            return real_run(x, stats)

        def split_outputs(values: Any, x: np.ndarray, sizes: Any, stats: Any) -> Any:
            self.calls.append((list(sizes), list(stats)))
            return real_split(values, x, sizes, stats)

        monkeypatch.setattr(model, "run_batch", run_batch)
        monkeypatch.setattr(model, "split_outputs", split_outputs)

    async def wait_started(self) -> None:
        """Until the first run holds the worker."""
        while not self.started.is_set():
            await asyncio.sleep(0.001)

    def release(self) -> None:
        self.gate.set()


def with_plane(
    model_repo: Path, body: Callable[[DataPlane], Awaitable[Any]], **settings: Any
) -> Any:
    """Start a data plane on the fixture repository, run ``body`` with it, stop it. The
    tiny model runs in the inference thread unless ``inline_small_models=True`` is given
    (the tests that hold a run need the event loop free)."""
    settings.setdefault("inline_small_models", False)

    async def main() -> Any:
        plane = DataPlane(make_settings(model_repo, **settings), ServiceMetrics())
        await plane.start()
        try:
            return await body(plane)
        finally:
            await plane.stop()

    return asyncio.run(main())


async def burst(
    plane: DataPlane,
    recorder: RunRecorder,
    model: LoadedModel,
    inputs: list[np.ndarray],
    stats: list[str],
) -> list[Any]:
    """One request holds the worker; ``inputs`` queue behind it; then the worker is freed.
    Returns the queued requests' results (or exceptions), in order."""
    blocker = asyncio.ensure_future(plane.infer(model, reference_inputs(1, seed=99)))
    await recorder.wait_started()
    tasks = [
        asyncio.ensure_future(plane.infer(model, x, s)) for x, s in zip(inputs, stats, strict=True)
    ]
    await asyncio.sleep(0.01)  # let every request reach the queue
    recorder.release()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_concurrent_requests_merge_into_one_run_and_get_their_own_results(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [reference_inputs(n, seed=i) for i, n in enumerate([1, 3, 1, 2, 1])]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        alone = [model.run(x, "none") for x in inputs]
        recorder = RunRecorder(model, monkeypatch)
        results = await burst(plane, recorder, model, inputs, ["none"] * len(inputs))
        assert recorder.calls == [([1], ["none"]), ([1, 3, 1, 2, 1], ["none"] * 5)]
        for result, single, x in zip(results, alone, inputs, strict=True):
            assert result.logits.shape == (x.shape[0], 10)
            np.testing.assert_allclose(result.logits, single.logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result.probabilities, single.probabilities, atol=1e-6)
            assert result.layer_stats is None
        runs = plane.metrics.registry.get_sample_value(
            "relu_serve_inference_batch_size_count", {"model": "tiny"}
        )
        assert runs == 2

    with_plane(model_repo, body)


def test_the_queue_length_gauge_is_set_after_each_run(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set per run, not per request: after the held run, its five followers are in the next
    run; after that one, nothing waits."""

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        lengths: list[float] = []
        monkeypatch.setattr(plane.metrics.queue_length, "set", lengths.append)
        inputs = [reference_inputs(n, seed=i) for i, n in enumerate([1, 3, 1, 2, 1])]
        await burst(plane, RunRecorder(model, monkeypatch), model, inputs, ["none"] * 5)
        assert lengths == [5, 0]

    with_plane(model_repo, body)


def test_the_run_size_limit_counts_each_requests_own_batch(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [2, 2, 1, 5, 1]  # limit 4: [2, 2], then [1] (5 does not fit), [5] alone, [1]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        recorder = RunRecorder(model, monkeypatch)
        inputs = [reference_inputs(n, seed=i) for i, n in enumerate(sizes)]
        results = await burst(plane, recorder, model, inputs, ["none"] * len(inputs))
        assert [r.logits.shape[0] for r in results] == sizes
        runs = [call[0] for call in recorder.calls[1:]]
        assert runs == [[2, 2], [1, 1], [5]]
        assert all(sum(run) <= 4 or len(run) == 1 for run in runs)

    with_plane(model_repo, body, batch_max_size=4)


def test_statistics_and_plain_requests_run_apart_and_get_what_they_asked(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = ["none", "summary", "none", "channels", "summary"]
    inputs = [reference_inputs(2, seed=10 + i) for i in range(len(stats))]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        alone = [model.run(x, s) for x, s in zip(inputs, stats, strict=True)]
        recorder = RunRecorder(model, monkeypatch)
        results = await burst(plane, recorder, model, inputs, stats)
        runs = recorder.calls[1:]
        assert sorted(runs) == sorted(
            [([2, 2], ["none", "none"]), ([2, 2, 2], ["summary", "channels", "summary"])]
        )
        for result, single, level in zip(results, alone, stats, strict=True):
            np.testing.assert_allclose(result.logits, single.logits, rtol=1e-5, atol=1e-6)
            if level == "none":
                assert result.layer_stats is None
                assert result.per_sample_active is None
                continue
            # statistics over the request's own samples, exactly as if it had run alone
            for got, want in zip(result.layer_stats, single.layer_stats, strict=True):
                assert got.keys() == want.keys()
                for key, value in want.items():
                    if isinstance(value, float) or (
                        isinstance(value, list) and value and isinstance(value[0], float)
                    ):
                        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
                    else:
                        assert got[key] == value, key
            for layer, rates in single.per_sample_active.items():
                np.testing.assert_allclose(result.per_sample_active[layer], rates, atol=1e-7)
            has_channels = ["channel_activity" in s for s in result.layer_stats]
            assert all(has_channels) == (level == "channels")
        # the monitor is fed per statistics request: 3 requests of 2 samples
        assert plane.repository.monitor("tiny").snapshot()["samples"] == 6

    with_plane(model_repo, body)


def test_a_merged_statistics_run_feeds_the_monitor_once_with_every_request(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One update per run (not per request), holding every sample of the run, in place before
    # any of its requests is answered.
    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        assert plane.repository is not None
        monitor = plane.repository.monitor("tiny")
        updates: list[int] = []
        real_update = monitor.update

        def update(rows: Any) -> None:
            updates.append(len(next(iter(rows.values()))))
            real_update(rows)

        monkeypatch.setattr(monitor, "update", update)
        recorder = RunRecorder(model, monkeypatch)
        blocker = asyncio.ensure_future(plane.infer(model, reference_inputs(1, seed=99)))
        await recorder.wait_started()
        sizes = [1, 3, 2]
        tasks = [
            asyncio.ensure_future(plane.infer(model, reference_inputs(n, seed=n), "summary"))
            for n in sizes
        ]
        await asyncio.sleep(0.01)
        recorder.release()
        await blocker
        first = await tasks[0]
        seen_when_answered = monitor.snapshot()["samples"]
        await asyncio.gather(*tasks)
        assert recorder.calls[1] == (sizes, ["summary"] * 3)  # one merged statistics run
        assert updates == [sum(sizes)]
        assert seen_when_answered == sum(sizes)
        assert first.per_sample_active is not None

    with_plane(model_repo, body)


def test_a_lone_request_does_not_wait_for_the_queue_delay(model_repo: Path) -> None:
    async def body(plane: DataPlane) -> float:
        model = plane.get_model("tiny")
        await plane.infer(model, reference_inputs(1))  # first-run set-up out of the way
        start = time.perf_counter()
        await plane.infer(model, reference_inputs(1))
        return time.perf_counter() - start

    # a 10 s delay would apply if an idle server waited for company; it must not
    elapsed = with_plane(model_repo, body, batch_max_delay_ms=10_000)
    assert elapsed < 2.0


def test_the_queue_delay_gathers_requests_after_a_busy_run(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        recorder = RunRecorder(model, monkeypatch)
        blocker = asyncio.ensure_future(plane.infer(model, reference_inputs(1)))
        await recorder.wait_started()
        first = asyncio.ensure_future(plane.infer(model, reference_inputs(1, seed=1)))
        await asyncio.sleep(0.01)
        recorder.release()
        await blocker
        # the worker is free, but the queued request waits up to 300 ms for company
        await asyncio.sleep(0.05)
        assert not first.done()
        second = asyncio.ensure_future(plane.infer(model, reference_inputs(1, seed=2)))
        await asyncio.gather(first, second)
        assert recorder.calls[1:] == [([1, 1], ["none", "none"])]

    with_plane(model_repo, body, batch_max_delay_ms=300)


def test_a_full_queue_answers_503_with_retry_after(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        recorder = RunRecorder(model, monkeypatch)
        inputs = [reference_inputs(1, seed=i) for i in range(3)]
        results = await burst(plane, recorder, model, inputs, ["none"] * 3)
        assert [type(r).__name__ for r in results[:2]] == ["RunResult", "RunResult"]
        error = results[2]
        assert isinstance(error, ServiceUnavailableError)
        assert error.headers == {"Retry-After": "1"}
        assert error.code == "queue_full"
        assert "max_queue_length" in error.message

    with_plane(model_repo, body, max_queue_length=2)


def test_admission_by_time_refuses_what_would_pass_the_deadline(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs take ~50 ms a sample; the deadline is 0.3 s: with one sample running, about six
    # more fit (each request's expected wait counts the samples ahead of it), later ones are
    # refused at once, not after waiting; once the queue drains, requests are let in again,
    # even one whose own run takes longer than the deadline (an idle model lets any in).
    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        real_run = model.run_batch

        def slow_run(x: np.ndarray, stats: str) -> Any:
            time.sleep(0.05 * x.shape[0])
            return real_run(x, stats)

        monkeypatch.setattr(model, "run_batch", slow_run)
        await plane.infer(model, reference_inputs(1, seed=98))  # measures the time per sample
        recorder = RunRecorder(model, monkeypatch)
        inputs = [reference_inputs(1, seed=i) for i in range(12)]
        results = await burst(plane, recorder, model, inputs, ["none"] * 12)
        kinds = ["ok" if type(r).__name__ == "RunResult" else r.code for r in results]
        admitted = kinds.count("ok")
        assert 3 <= admitted <= 6, kinds
        assert kinds == ["ok"] * admitted + ["overloaded"] * (12 - admitted)
        error = results[-1]
        assert isinstance(error, ServiceUnavailableError)
        assert "request_deadline_s" in error.message
        assert "expected wait" in error.message
        assert int(error.headers["Retry-After"]) >= 1
        assert type(await plane.infer(model, inputs[0])).__name__ == "RunResult"
        assert type(await plane.infer(model, reference_inputs(8, seed=7))).__name__ == "RunResult"

    with_plane(model_repo, body, request_deadline_s=0.3, max_queue_length=100)


def test_a_bad_input_fails_alone(model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = reference_inputs(1, seed=3)
    bad[0, 0, 0, 0] = np.nan
    inputs = [reference_inputs(1, seed=1), bad, reference_inputs(2, seed=2)]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        recorder = RunRecorder(model, monkeypatch)
        results = await burst(plane, recorder, model, inputs, ["none"] * 3)
        assert isinstance(results[1], ModelInputError)
        assert "non-finite" in str(results[1])
        assert results[0].logits.shape == (1, 10)
        assert results[2].logits.shape == (2, 10)
        assert recorder.calls[1:] == [([1, 2], ["none", "none"])]

    with_plane(model_repo, body)


@pytest.mark.parametrize(
    ("stats", "sampling", "monitored"),
    # the good requests' 3 samples are monitored when run with statistics; sampling all
    # requests monitors the plain request that holds the worker in ``burst`` too
    [("none", "requested", 0), ("summary", "requested", 3), ("none", 1.0, 4)],
    ids=["plain", "statistics", "sampled"],
)
def test_an_input_that_overflows_inside_the_model_fails_alone_and_stays_out_of_the_monitor(
    model_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    stats: str,
    sampling: str | float,
    monitored: int,
) -> None:
    # 3e38 passes the input check (finite) and overflows in the model: the output is NaN.
    bad = reference_inputs(2, seed=3)
    bad[1] = 3e38
    inputs = [reference_inputs(1, seed=1), bad, reference_inputs(2, seed=2)]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        assert plane.repository is not None
        monitor = plane.repository.monitor("tiny")
        alone = [model.run(x, stats) for x in (inputs[0], inputs[2])]
        recorder = RunRecorder(model, monkeypatch)
        results = await burst(plane, recorder, model, inputs, [stats] * 3)
        run_stats = "none" if sampling == "requested" and stats == "none" else "summary"
        assert recorder.calls[-1] == ([1, 2, 2], [run_stats] * 3)  # one run for the three
        error = results[1]
        assert isinstance(error, UnprocessableError)
        assert (error.status_code, error.code) == (422, "non_finite_output")
        assert "model 'tiny'" in error.message
        assert "output for sample 1 is not finite" in error.message
        for result, single in zip([results[0], results[2]], alone, strict=True):
            np.testing.assert_allclose(result.logits, single.logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result.probabilities, single.probabilities, atol=1e-7)
            assert result.layer_stats == single.layer_stats
        snapshot = monitor.snapshot()
        assert snapshot["samples"] == monitored
        for entry in snapshot["layers"]:
            assert all(0.0 <= rate <= 1.0 for rate in entry["channel_activity"]), entry
        assert (await plane.infer(model, inputs[0], stats)).logits.shape == (1, 10)

    with_plane(model_repo, body, monitor_sampling=sampling)


def break_merged_runs(model: LoadedModel, monkeypatch: pytest.MonkeyPatch, bad: np.ndarray) -> None:
    """Make every run of ``model`` over more than one sample (the requests here have one
    each) fail, and a run of ``bad`` alone fail too."""
    real_batch, real_run = model.run_batch, model.run

    def run_batch(x: np.ndarray, stats: str) -> Any:
        if len(x) > 1:
            raise RuntimeError("onnxruntime failed on the merged batch")
        return real_batch(x, stats)

    def run(x: np.ndarray, stats: str = "none") -> Any:
        if np.array_equal(x, bad):
            raise RuntimeError("this input breaks the model")
        return real_run(x, stats)

    monkeypatch.setattr(model, "run_batch", run_batch)
    monkeypatch.setattr(model, "run", run)


def test_a_failed_merged_run_is_retried_request_by_request(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [reference_inputs(1, seed=i) for i in range(3)]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        recorder = RunRecorder(model, monkeypatch)
        break_merged_runs(model, monkeypatch, bad=inputs[1])
        results = await burst(plane, recorder, model, inputs, ["none"] * 3)
        assert results[0].logits.shape == (1, 10)
        assert isinstance(results[1], RuntimeError)
        assert results[2].logits.shape == (1, 10)

    with_plane(model_repo, body)


def test_small_models_run_on_the_event_loop_batching_one_loop_step(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [reference_inputs(n, seed=i) for i, n in enumerate([1, 2, 1, 3])]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        assert model.small
        alone = [model.run(x, "summary") for x in inputs]
        recorder = RunRecorder(model, monkeypatch, hold=False)
        # Requests made in one step of the loop share one run; a later one runs by itself.
        first = await asyncio.gather(*(plane.infer(model, x, "summary") for x in inputs))
        later = await plane.infer(model, inputs[0], "summary")
        assert recorder.calls == [([1, 2, 1, 3], ["summary"] * 4), ([1], ["summary"])]
        assert recorder.threads == [threading.get_ident()] * 2  # the event loop's thread
        for result, single in zip([*first, later], [*alone, alone[0]], strict=True):
            np.testing.assert_allclose(result.logits, single.logits, rtol=1e-5, atol=1e-6)
            assert result.layer_stats == single.layer_stats

    with_plane(model_repo, body, inline_small_models=True)


def test_an_inline_merged_run_that_fails_is_retried_request_by_request(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [reference_inputs(1, seed=i) for i in range(3)]

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("tiny")
        break_merged_runs(model, monkeypatch, bad=inputs[1])
        results = await asyncio.gather(
            *(plane.infer(model, x) for x in inputs), return_exceptions=True
        )
        assert results[0].logits.shape == (1, 10)
        assert isinstance(results[1], RuntimeError)
        assert results[2].logits.shape == (1, 10)
        assert (await plane.infer(model, inputs[0])).logits.shape == (1, 10)  # still serving

    with_plane(model_repo, body, inline_small_models=True)


def test_batching_settings_per_model(model_repo: Path) -> None:
    settings = make_settings(
        model_repo,
        batch_max_size=16,
        batch_max_delay_ms=2,
        model_batching={"tiny": {"max_size": 4}, "foreign": {"max_delay_ms": 0}},
    )
    assert settings.batching_for("tiny") == (4, 0.002)
    assert settings.batching_for("foreign") == (16, 0.0)
    assert settings.batching_for("other") == (16, 0.002)


def test_a_model_with_a_fixed_batch_axis_never_merges_and_refuses_other_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    from tests.service.conftest import make_onnx_cnn

    proto = make_onnx_cnn(with_metadata=False, name="fixed")
    for value_info in (proto.graph.input[0], proto.graph.output[0]):
        value_info.type.tensor_type.shape.dim[0].dim_value = 1  # batch axis fixed at 1
    (tmp_path / "fixed" / "1").mkdir(parents=True)
    onnx.save(proto, tmp_path / "fixed" / "1" / "model.onnx")

    async def body(plane: DataPlane) -> None:
        model = plane.get_model("fixed")
        recorder = RunRecorder(model, monkeypatch)
        inputs = [reference_inputs(1, seed=i) for i in range(3)]
        results = await burst(plane, recorder, model, inputs, ["none"] * 3)
        assert [r.logits.shape for r in results] == [(1, 10)] * 3
        assert [call[0] for call in recorder.calls] == [[1]] * 4  # one request per run
        with pytest.raises(
            ModelInputError, match="fixed batch size of 1 in this model; got a batch of 2"
        ):
            await plane.infer(model, reference_inputs(2))

    with_plane(tmp_path, body)
