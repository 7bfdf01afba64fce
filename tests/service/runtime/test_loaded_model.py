"""LoadedModel: two sessions, input checks, statistics, probabilities, top-k, info."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.runtime import loaded_model as model_module
from service.runtime.activations import infer_tensor_shapes
from service.runtime.loaded_model import (
    LoadedModel,
    ModelInputError,
    ModelLoadError,
    NonFiniteOutputError,
    multiply_accumulates,
    softmax,
    top_k,
)
from service.runtime.providers import with_options
from tests.service.conftest import (
    make_onnx_cnn,
    numpy_layer_stats,
    reference_inputs,
    run_with_activations,
    save_model,
)


@pytest.fixture(scope="module")
def tiny(tiny_cnn_path: Path) -> LoadedModel:
    model = LoadedModel.load(tiny_cnn_path, "tiny", "1")
    model.warm_up()
    return model


@pytest.fixture(scope="module")
def foreign(model_repo: Path) -> LoadedModel:
    model = LoadedModel.load(model_repo / "foreign" / "1" / "model.onnx", "foreign", "1")
    model.warm_up()
    return model


def test_load_reads_metadata_and_describes_the_model(tiny: LoadedModel) -> None:
    info = tiny.info()
    assert info["name"] == "tiny"
    assert info["version"] == "1"
    assert info["input"] == {"name": "input", "shape": [-1, 1, 8, 8], "dtype": "float32"}
    assert info["output"] == {"name": "logits", "kind": "logits"}
    assert info["labels"] == [str(i) for i in range(10)]
    assert info["preprocessing"]["mean"] == [0.5]
    assert [layer["name"] for layer in info["activation_layers"]] == [
        "features.0.act",
        "features.1.act",
    ]
    assert info["providers_used"] == ["CPUExecutionProvider"]
    assert info["fell_back"] is False
    assert info["has_reference"] is True
    assert info["statistics"] is True


def test_foreign_model_is_described_from_its_graph(foreign: LoadedModel) -> None:
    info = foreign.info()
    assert info["has_metadata"] is False
    assert info["preprocessing"] is None
    assert info["input"]["name"] == "x"
    assert info["input"]["shape"] == [-1, 3, 16, 16]
    assert info["labels"] == ["0", "1", "2", "3", "4"]
    assert [(a["kind"], a["channels"]) for a in info["activation_layers"]] == [
        ("leaky_relu", 6),
        ("sigmoid", 5),
    ]
    assert info["has_reference"] is False


def test_request_without_statistics_runs_the_plain_session(tiny: LoadedModel) -> None:
    assert [o.name for o in tiny.plain_session.get_outputs()] == ["logits"]
    assert len(tiny.stats_session.get_outputs()) > 1

    class Exploding:
        def run(self, *args, **kwargs):
            raise AssertionError("the statistics session ran for a request without statistics")

    stats_session, tiny.stats_session = tiny.stats_session, Exploding()
    try:
        result = tiny.run(reference_inputs(2), "none")
    finally:
        tiny.stats_session = stats_session
    assert result.layer_stats is None
    assert result.per_sample_active is None
    assert result.logits.shape == (2, 10)


def test_plain_and_statistics_sessions_agree(tiny: LoadedModel, foreign: LoadedModel) -> None:
    for model, shape in ((tiny, (1, 8, 8)), (foreign, (3, 16, 16))):
        x = reference_inputs(6, shape, seed=3)
        plain = model.run(x, "none")
        stats = model.run(x, "summary")
        np.testing.assert_allclose(stats.logits, plain.logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(stats.probabilities, plain.probabilities, rtol=0, atol=1e-6)


def test_probabilities_are_a_softmax_of_the_logits(tiny: LoadedModel) -> None:
    result = tiny.run(reference_inputs(3), "none")
    z = result.logits.astype(np.float64)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-6)
    assert result.probabilities.dtype == np.float32


def test_softmax_output_is_not_softmaxed_twice(tmp_path: Path) -> None:
    path = save_model(make_onnx_cnn(softmax=True, name="sm"), tmp_path / "sm" / "1" / "model.onnx")
    model = LoadedModel.load(path, "sm", "1")
    result = model.run(reference_inputs(2), "none")
    assert model.output_kind == "probabilities"
    np.testing.assert_array_equal(result.probabilities, result.logits)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_summary_statistics_match_numpy(tiny: LoadedModel, tiny_cnn_path: Path) -> None:
    x = reference_inputs(5, seed=9)
    result = tiny.run(x, "summary")
    raw = run_with_activations(
        onnx.load(str(tiny_cnn_path)), x, [layer.tensor for layer in tiny.layers]
    )
    assert [s["name"] for s in result.layer_stats] == ["features.0.act", "features.1.act"]
    for layer, stats in zip(tiny.layers, result.layer_stats, strict=True):
        want = numpy_layer_stats(raw[layer.tensor], layer.kind)
        assert "channel_activity" not in stats  # only with "channels"
        assert stats["inactive_fraction"] == pytest.approx(want["inactive_fraction"], abs=1e-7)
        assert stats["dead_units"] == want["dead_units"]
        assert (stats["min"], stats["max"]) == (want["min"], want["max"])
        assert stats["mean"] == pytest.approx(want["mean"], rel=1e-5)
        assert stats["std"] == pytest.approx(want["std"], rel=1e-5)
        np.testing.assert_allclose(
            result.per_sample_active[layer.name], want["per_sample_active"], atol=1e-7
        )


def test_channels_mode_adds_per_channel_activity(tiny: LoadedModel) -> None:
    result = tiny.run(reference_inputs(4, seed=1), "channels")
    for layer, stats in zip(tiny.layers, result.layer_stats, strict=True):
        assert len(stats["channel_activity"]) == layer.channels
    summary = tiny.run(reference_inputs(4, seed=1), "summary").layer_stats[0]
    assert "channel_activity" not in summary


def test_relu_minimum_when_no_unit_is_ever_inactive(tmp_path: Path) -> None:
    """Zero weights and positive biases: every element of the first ReLU layer is positive,
    so its minimum is not structurally 0 and must be measured (the raw-output fall-back)."""
    proto = make_onnx_cnn(name="positive", seed=4)
    for init in proto.graph.initializer:
        if init.name == "conv0.weight":
            init.CopyFrom(numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), init.name))
        if init.name == "conv0.bias":
            bias = np.array([0.5, 0.25, 2.0, 1.0], np.float32)
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    path = save_model(proto, tmp_path / "positive" / "1" / "model.onnx")
    model = LoadedModel.load(path, "positive", "1")
    result = model.run(reference_inputs(3), "summary")
    first = result.layer_stats[0]
    assert first["inactive_fraction"] == 0.0
    assert first["min"] == pytest.approx(0.25)
    assert (first["max"], first["dead_units"]) == (pytest.approx(2.0), 0)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((1, 1, 8, 8), np.float64), "must have dtype float32, got float64"),
        (np.zeros((1, 1, 8, 8), np.int64), "must have dtype float32, got int64"),
        (np.zeros((1, 8, 8), np.float32), r"must have rank 4 \(shape \[N, 1, 8, 8\]\)"),
        (np.zeros((1, 3, 8, 8), np.float32), r"dim 1 is 3, expected 1"),
        (np.zeros((2, 1, 8, 9), np.float32), r"dim 3 is 9, expected 8"),
        (np.zeros((0, 1, 8, 8), np.float32), "batch size 0"),
        ([[0.0]], "must be a numpy array"),
    ],
)
def test_bad_inputs_are_typed_errors(tiny: LoadedModel, x, message: str) -> None:
    with pytest.raises(ModelInputError, match=message):
        tiny.run(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_rejected(tiny: LoadedModel, bad: float) -> None:
    x = reference_inputs(2)
    x[1, 0, 3, 3] = bad
    with pytest.raises(
        ModelInputError, match=r"1 non-finite values \(NaN or infinity\), in sample 1;"
    ):
        tiny.run(x, "summary")


@pytest.mark.parametrize("stats", ["none", "summary", "channels"])
def test_a_request_whose_output_is_not_finite_fails_alone_in_a_merged_run(
    tiny: LoadedModel, stats: str
) -> None:
    # 3e38 is a finite float32; the first convolution overflows it, the second makes NaN.
    bad = reference_inputs(3, seed=3)
    bad[1] = 3e38
    good = [reference_inputs(1, seed=1), reference_inputs(2, seed=2)]
    x = np.concatenate([good[0], bad, good[1]])
    results = tiny.run_split(x, [1, 3, 2], [stats] * 3)
    error = results[1]
    assert isinstance(error, NonFiniteOutputError)
    assert error.samples == [1]
    assert "output for sample 1 is not finite" in str(error)
    assert "overflows inside the model" in str(error)
    for result, xi in zip([results[0], results[2]], good, strict=True):
        assert not isinstance(result, BaseException)
        alone = tiny.run(xi, stats)
        np.testing.assert_allclose(result.logits, alone.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.probabilities, alone.probabilities, atol=1e-7)
        assert np.isfinite(result.probabilities).all()
        assert (result.layer_stats is None) == (stats == "none")
        if stats != "none":
            assert result.per_sample_active is not None
            assert all(np.isfinite(rates).all() for rates in result.per_sample_active.values())
    with pytest.raises(NonFiniteOutputError, match="sample 1 is not finite"):
        tiny.run(bad, stats)


def test_every_sample_whose_output_is_not_finite_is_named(tiny: LoadedModel) -> None:
    x = np.full((4, 1, 8, 8), 3e38, np.float32)
    x[2] = reference_inputs(1)[0]
    with pytest.raises(NonFiniteOutputError, match="samples 0, 1, 3 is not finite") as caught:
        tiny.run(x)
    assert caught.value.samples == [0, 1, 3]


def test_unknown_statistics_option_names_the_choices(tiny: LoadedModel) -> None:
    with pytest.raises(ModelInputError, match="choose one of none, summary, channels"):
        tiny.run(reference_inputs(1), "all")


def test_model_input_error_is_a_value_error() -> None:
    assert issubclass(ModelInputError, ValueError)


def test_top_k_orders_and_clips() -> None:
    probs = np.array([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]], np.float32)
    labels = ["a", "b", "c", "d"]
    ranked = top_k(probs, 2, labels)
    assert [[r["label"] for r in row] for row in ranked] == [["b", "d"], ["a", "b"]]
    assert ranked[0][0] == {"label": "b", "index": 1, "probability": pytest.approx(0.5)}
    assert len(top_k(probs, 10, labels)[0]) == 4
    assert len(top_k(probs[0], 1, labels)) == 1  # a single (K,) row
    with pytest.raises(ModelInputError, match="at least 1"):
        top_k(probs, 0, labels)


@pytest.mark.parametrize("shape", [(2, 10), (4, 300)])  # Python's sort, then numpy's
def test_top_k_is_a_stable_descending_order(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 5, shape).astype(np.float32) / 4  # many ties
    labels = [f"l{i}" for i in range(shape[1])]
    ranked = top_k(probs, 7, labels)
    want = np.argsort(-probs, axis=1, kind="stable")[:, :7]  # ties keep label order
    assert [[r["index"] for r in row] for row in ranked] == want.tolist()
    assert [[r["probability"] for r in row] for row in ranked] == np.take_along_axis(
        probs, want, 1
    ).tolist()


def conv_classifier(channels: int, size: int) -> onnx.ModelProto:
    """Conv 3x3 (padded, 1 -> ``channels``) -> ReLU -> global average -> Gemm to 10."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((10, channels)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("channels", "size", "threads"), [(4, 8, 1), (64, 96, 2)])
def test_small_models_run_on_one_intra_op_thread(
    tmp_path: Path, channels: int, size: int, threads: int
) -> None:
    model = conv_classifier(channels, size)
    expected = channels * size * size * 9 + 10 * channels  # 9 per conv output; Gemm 10 x C
    assert multiply_accumulates(model, infer_tensor_shapes(model)) == expected
    path = save_model(model, tmp_path / "m" / "1" / "model.onnx")
    loaded = LoadedModel.load(path, "m", "1", threads=2)
    for session in (loaded.plain_session, loaded.stats_session):
        assert session.get_session_options().intra_op_num_threads == threads


def test_softmax_is_stable_for_large_scores() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]], atol=1e-7)


@pytest.mark.usefixtures("cpu_only")
def test_requested_cuda_falls_back_to_cpu_loudly(
    tiny_cnn_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model = LoadedModel.load(tiny_cnn_path, "tiny", "1", providers="cuda")
    info = model.info()
    assert info["fell_back"] is True
    assert info["providers_used"] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in info["fallback_reason"]
    assert any("fall-back" in r.getMessage() for r in caplog.records)


def test_shared_weights_give_the_same_answers(tiny_cnn_path: Path, tiny: LoadedModel) -> None:
    shared = LoadedModel.load(tiny_cnn_path, "tiny", "1", share_weights=True, threads=1)
    x = reference_inputs(4, seed=6)
    np.testing.assert_array_equal(shared.run(x).logits, tiny.run(x).logits)
    a, b = shared.run(x, "summary"), tiny.run(x, "summary")
    assert a.layer_stats == b.layer_stats


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not a protobuf", "not a valid ONNX model"),
        (b"", "not a valid ONNX model"),
    ],
)
def test_broken_file_error_names_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=reason) as info:
        LoadedModel.load(path, "broken", "1")
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.onnx"
    with pytest.raises(ModelLoadError, match="cannot read") as info:
        LoadedModel.load(path, "x", "1")
    assert str(path) in str(info.value)


def test_metadata_that_contradicts_the_graph_is_a_load_error(
    tmp_path: Path, tiny_cnn_path: Path
) -> None:
    proto = onnx.load(str(tiny_cnn_path))
    for prop in proto.metadata_props:
        prop.value = prop.value.replace('"input_name":"input"', '"input_name":"image"')
    path = save_model(proto, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match="input_name 'image'"):
        LoadedModel.load(path, "m", "1")
    proto.metadata_props[0].value = "{not json"
    path = save_model(proto, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match="invalid relu_serve metadata"):
        LoadedModel.load(path, "m", "1")


def test_minimum_fallback_refuses_a_changed_file(tmp_path: Path, tiny_cnn_path: Path) -> None:
    path = tmp_path / "tiny" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    shutil.copyfile(tiny_cnn_path, path)
    model = LoadedModel.load(path, "tiny", "1")
    path.write_bytes(b"replaced")
    assert model._exact_minimum(reference_inputs(1), model.layers) == {}


def test_model_without_activation_layers_has_empty_statistics(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    model = LoadedModel.load(save_model(proto, tmp_path / "linear.onnx"), "linear", "1")
    model.warm_up()
    result = model.run(np.ones((2, 4), np.float32), "summary")
    assert result.layer_stats == []
    assert result.per_sample_active == {}
    np.testing.assert_allclose(result.logits, 4.0)
    assert model.labels == ["0", "1", "2"]


class RecordingSession:
    """An onnxruntime session that records the batch size of each run."""

    def __init__(self, session: object) -> None:
        self.session = session
        self.batches: list[int] = []

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.session.run(names, feeds)


def test_runs_on_a_gpu_are_padded_to_one_batch_size(
    tiny_cnn_path: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tiny.run_size is None  # on the CPU, runs keep their size
    monkeypatch.setattr(model_module, "CPU", "NoSuchProvider")  # the CPU stands in for a GPU
    padded = LoadedModel.load(tiny_cnn_path, "tiny", "1", gpu_batch=8)
    assert padded.run_size == 8
    plain, stats = RecordingSession(padded.plain_session), RecordingSession(padded.stats_session)
    padded.plain_session, padded.stats_session = plain, stats
    padded.warm_up()
    assert plain.batches == [8]
    assert stats.batches == [8]
    x = reference_inputs(3, seed=4)
    for level in ("none", "channels"):
        got, want = padded.run(x, level), tiny.run(x, level)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        assert got.logits.shape == (3, 10)
        if level == "channels":
            for a, b in zip(got.layer_stats, want.layer_stats, strict=True):
                assert a["samples"] == b["samples"] == 3
                assert a["dead_channels"] == b["dead_channels"]
                assert a["inactive_fraction"] == pytest.approx(b["inactive_fraction"], abs=1e-6)
                assert a["channel_activity"] == pytest.approx(b["channel_activity"], abs=1e-6)
    padded.run(reference_inputs(9, seed=5))  # more than the padded size: run as it is
    assert plain.batches == [8, 8, 9]
    assert stats.batches == [8, 8]


def test_cuda_sessions_are_asked_for_full_float32() -> None:
    assert with_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}),
        "CPUExecutionProvider",
    ]
