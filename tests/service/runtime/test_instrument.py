"""Statistics computed inside the graph equal the same statistics computed in numpy from the
raw activation tensors (fetched from a copy of the model with the activations as outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.metadata import ACTIVATION_KINDS, ActivationLayer, ModelMetadata
from service.runtime.activations import ActivationNode, find_activation_nodes
from service.runtime.instrument import STATS_OUTPUT, StatsLayout, instrument_model, layer_stat_names
from service.runtime.summaries import per_sample_active, summarize_layers, summarize_requests
from tests.service.conftest import (
    make_onnx_cnn,
    numpy_layer_stats,
    reference_inputs,
    run_with_activations,
)

KINDS = list(ACTIVATION_KINDS)


def run_instrumented(model: onnx.ModelProto, layers: list[ActivationNode], x: np.ndarray) -> dict:
    """All outputs of the instrumented model, optimized as the service runs it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        instrument_model(model, layers).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x}), strict=True))


def assert_stats_match(layers: list[ActivationNode], outputs: dict, raw: dict) -> None:
    """Every statistic the service returns against the numpy oracle on the raw tensors.

    Counts, rates, min and max are exact (up to the float32 division in the pooling); mean
    and std are compared relatively (1e-5) with a 1e-6 floor, because the graph sums in
    float32 and numpy in float64 (see summarize_layers' docstring for the error bound).
    """
    layout = StatsLayout.of(layers)
    summaries = summarize_layers(layers, layout, outputs, channels=True)
    active = per_sample_active(layout, outputs)
    for layer, got in zip(layers, summaries, strict=True):
        want = numpy_layer_stats(raw[layer.tensor], layer.kind)
        assert got["name"] == layer.name
        np.testing.assert_allclose(active[layer.name], want["per_sample_active"], atol=1e-7)
        np.testing.assert_allclose(got["channel_activity"], want["channel_activity"], atol=1e-7)
        assert got["inactive_fraction"] == pytest.approx(want["inactive_fraction"], abs=1e-7)
        assert got["dead_units"] == want["dead_units"]
        assert got["dead_channels"] == want["dead_channels"]
        assert got["max"] == want["max"]
        assert got["min"] == want["min"]
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-6)
        assert got["std"] == pytest.approx(want["std"], rel=1e-5, abs=1e-6)
        if want["saturated_fraction"] is None:
            assert got["saturated_fraction"] is None
        else:
            assert got["saturated_fraction"] == pytest.approx(want["saturated_fraction"], abs=1e-7)
        assert got["samples"] == raw[layer.tensor].shape[0]


def identity_conv_model(kind: str, channels: int = 16) -> onnx.ModelProto:
    """input (N, C, 4, 4) -> Conv 1x1 identity -> activation -> GAP -> Flatten -> Gemm.

    The identity convolution makes the activation's input equal the model input bit for bit
    (1 * x plus exact zeros), while the activation output still comes from a Conv, so
    onnxruntime's NCHWc path (blocked layout) is what gets measured for C = 16.
    """
    weight = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "b"),
        numpy_helper.from_array(np.ones((3, channels), np.float32), "fc"),
    ]
    op = ACTIVATION_KINDS[kind]
    act_inputs = ["conv"]
    if kind == "prelu":
        inits.append(numpy_helper.from_array(np.full((channels, 1, 1), 0.2, np.float32), "slope"))
        act_inputs.append("slope")
    if kind == "relu6":
        inits += [
            numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
            numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        ]
        act_inputs += ["lo", "hi"]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], kernel_shape=[1, 1]),
        helper.make_node(op, act_inputs, ["act"], name="act"),
        helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def edge_inputs(channels: int = 16) -> np.ndarray:
    """(3, C, 4, 4): exact zeros, tiny positives and negatives, the smallest normal float32,
    large values, and one channel that is never positive (dead)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, channels, 4, 4)).astype(np.float32)
    x[:, 0] = 0.0  # exact zeros only: dead for every kind whose f(0) = 0
    x[:, 1] = np.float32(1e-35)  # tiny positive: must count as active
    x[:, 2] = np.float32(-1e-35)
    x[:, 3, ::2] = np.finfo(np.float32).tiny  # 2**-126, smallest normal
    x[:, 3, 1::2] = 0.0
    x[:, 4] = -np.abs(x[:, 4]) - 0.5  # never positive
    x[0, 5, 0, 0] = 1e15  # large, yet its square (1e30) fits float32
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_active_test_is_exact_on_zeros_and_tiny_positives(kind: str) -> None:
    model = identity_conv_model(kind)
    layers = find_activation_nodes(model)
    assert [(a.kind, a.channels, a.rank) for a in layers] == [(kind, 16, 4)]
    x = edge_inputs()
    raw = run_with_activations(model, x, ["act"])
    outputs = run_instrumented(model, layers, x)
    active = outputs[STATS_OUTPUT][:, :16]  # (N, C): the only layer's first block
    np.testing.assert_array_equal(active, (raw["act"] > 0).mean(axis=(2, 3)))
    if kind not in ("sigmoid",):
        assert (active[:, 1] == 1.0).all()  # 1e-35 is active
        assert (active[:, 3] == 0.5).all()  # half the positions hold 2**-126
    assert_stats_match(layers, outputs, raw)


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_match_numpy_for_every_activation_kind(kind: str) -> None:
    # Conv layers (rank 4) and a dense hidden layer (rank 2), all of the same kind.
    model = make_onnx_cnn(
        activations=(kind, kind), hidden=6, hidden_activation=kind, with_metadata=False, seed=11
    )
    layers = find_activation_nodes(model)
    assert [a.rank for a in layers] == [4, 4, 2]
    assert {a.kind for a in layers} == {kind}
    x = reference_inputs(7, seed=2)
    x[0] = 0.0  # a sample of exact zeros
    raw = run_with_activations(model, x, [a.tensor for a in layers])
    outputs = run_instrumented(model, layers, x)
    assert_stats_match(layers, outputs, raw)


def test_statistics_match_numpy_for_the_tiny_and_foreign_fixtures(
    tiny_cnn_path: Path, model_repo: Path
) -> None:
    for path in (tiny_cnn_path, model_repo / "foreign" / "1" / "model.onnx"):
        model = onnx.load(str(path))
        metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        layers = find_activation_nodes(model, metadata.activations if metadata else None)
        assert len(layers) == 2
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
        x = reference_inputs(9, tuple(shape), seed=4)
        raw = run_with_activations(model, x, [a.tensor for a in layers])
        outputs = run_instrumented(model, layers, x)
        assert_stats_match(layers, outputs, raw)


def test_dead_channel_is_found_exactly(dead_channel_model_path: Path) -> None:
    model = onnx.load(str(dead_channel_model_path))
    layers = find_activation_nodes(model)
    x = reference_inputs(5, seed=8)
    outputs = run_instrumented(model, layers, x)
    first = summarize_layers(layers, StatsLayout.of(layers), outputs)[0]
    assert first["dead_channels"] == [0]
    assert first["dead_units"] == 1


def test_requests_in_one_batch_are_summarized_each_over_its_own_samples(
    tiny_cnn_path: Path,
) -> None:
    model = onnx.load(str(tiny_cnn_path))
    layers = find_activation_nodes(model)
    layout = StatsLayout.of(layers)
    x = reference_inputs(6, seed=5)
    packed = run_instrumented(model, layers, x)[STATS_OUTPUT]
    # Request 1 sees a first layer with no inactive element: its ReLU minimum is not
    # structural, so only that request's minimum is probed.
    active = layout.blocks[(layers[0].name, "active")]
    packed[3:5, active] = 1.0
    asked = []

    def probe(request: int, missing: list[ActivationNode]) -> dict[str, float]:
        asked.append((request, [layer.name for layer in missing]))
        return {layer.name: 0.5 for layer in missing}

    sizes, channels = [3, 2, 1], [True, False, True]
    merged = summarize_requests(layers, layout, packed, sizes, channels, probe)
    assert asked == [(1, [layers[0].name])]
    start = 0
    for size, wants_channels, got in zip(sizes, channels, merged, strict=True):
        alone = summarize_layers(
            layers,
            layout,
            {STATS_OUTPUT: packed[start : start + size]},
            channels=wants_channels,
            batch_mins={layers[0].name: 0.5},
        )
        assert got == alone
        assert all(s["samples"] == size for s in got)
        start += size
    assert merged[1][0]["min"] == 0.5
    assert merged[1][0]["inactive_fraction"] == 0.0
    assert merged[0][0]["min"] == 0.0
    assert "channel_activity" not in merged[1][0]


def test_original_outputs_stay_first_and_unchanged(tiny_cnn_path: Path) -> None:
    model = onnx.load(str(tiny_cnn_path))
    layers = find_activation_nodes(model)
    instrumented = instrument_model(model, layers)
    names = [o.name for o in instrumented.graph.output]
    assert names[0] == "logits"
    layout = StatsLayout.of(layers)
    assert names[1:] == layout.outputs == ["stats/packed"]
    # Layer-major blocks: [active, max, mean, dmean, dmeansq] of layer 0 (4 channels), then
    # layer 1.
    assert layout.blocks[(layers[0].name, "active")] == slice(0, 4)
    assert layout.blocks[(layers[0].name, "dmeansq")] == slice(16, 20)
    assert layout.blocks[(layers[1].name, "active")] == slice(20, 28)
    assert layout.width == 5 * 4 + 5 * 8
    assert layout.columns["active"] == {layers[0].name: slice(0, 4), layers[1].name: slice(4, 12)}
    assert len(model.graph.node) < len(instrumented.graph.node)  # the input is not modified
    onnx.checker.check_model(instrumented, full_check=True)
    x = reference_inputs(3, seed=1)
    plain = run_with_activations(model, x, [])["logits"]
    outputs = run_instrumented(model, layers, x)
    np.testing.assert_allclose(outputs["logits"], plain, rtol=0, atol=1e-6)
    assert outputs["stats/packed"].shape == (3, 60)


def test_relu_layers_have_no_min_output_and_saturating_ones_have_saturation() -> None:
    def layer(kind: str) -> ActivationNode:
        return ActivationNode("l", kind, ACTIVATION_KINDS[kind], "t", 4, 4)

    moments = ["active", "max", "mean", "dmean", "dmeansq"]
    assert layer_stat_names(layer("relu")) == moments
    assert layer_stat_names(layer("relu6")) == moments
    assert layer_stat_names(layer("elu")) == [*moments, "min"]
    assert layer_stat_names(layer("tanh"))[-1] == "saturated"


def test_foreign_graph_discovery_names_kinds_and_channels() -> None:
    model = make_onnx_cnn(
        activations=("relu6", "tanh"), channels=(3, 5), hidden=7, hidden_activation="leaky_relu",
        softmax=True, with_metadata=False,
    )  # fmt: skip
    layers = find_activation_nodes(model)
    assert [(a.name, a.kind, a.op_type, a.channels, a.rank) for a in layers] == [
        ("/features.0/act/Clip", "relu6", "Clip", 3, 4),
        ("/features.1/act/Tanh", "tanh", "Tanh", 5, 4),
        ("/hidden_act/LeakyRelu", "leaky_relu", "LeakyRelu", 7, 2),
    ]


def test_clip_other_than_relu6_and_output_activations() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(
        [
            helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip01"),
            helper.make_node("Sigmoid", ["c"], ["y"], name="head"),  # a graph output: the head
        ],
        "g",
        [x],
        [y],
        initializer=[
            numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
            numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = find_activation_nodes(model)
    assert [(a.name, a.kind) for a in layers] == [("clip01", "clip")]


def test_activation_patterns_in_other_orders_and_gates_by_hand() -> None:
    """GELU as (0.5 * x) * (1 + erf(x * 1/sqrt 2)) is one gelu layer; a Sigmoid multiplying
    another tensor is a gate (left out); an Erf chain with another scale is no GELU; a plain
    Sigmoid feeding a Relu stays a sigmoid layer."""
    scalars = {"inv_sqrt2": 0.70710677, "half": 0.5, "one": 1.0, "wrong": 0.4}
    nodes = [
        helper.make_node("Mul", ["x", "inv_sqrt2"], ["u"]),
        helper.make_node("Erf", ["u"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["a"]),
        helper.make_node("Mul", ["half", "x"], ["hx"]),
        helper.make_node("Mul", ["hx", "a"], ["gelu"], name="gelu"),
        helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
        helper.make_node("Mul", ["z", "s"], ["gated"]),
        helper.make_node("Mul", ["x", "wrong"], ["u2"]),
        helper.make_node("Erf", ["u2"], ["e2"]),
        helper.make_node("Add", ["e2", "one"], ["a2"]),
        helper.make_node("Mul", ["x", "a2"], ["m2"]),
        helper.make_node("Mul", ["m2", "half"], ["not_gelu"]),
        helper.make_node("Sigmoid", ["z"], ["plain"], name="plain"),
        helper.make_node("Relu", ["plain"], ["after"], name="after"),
    ]
    outs = ["gelu", "gated", "not_gelu", "after"]
    graph = helper.make_graph(
        [*nodes, *(helper.make_node("Identity", [t], [t + "_out"]) for t in outs)],
        "patterns",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("x", "z")],
        [helper.make_tensor_value_info(t + "_out", TensorProto.FLOAT, ["N", 4]) for t in outs],
        initializer=[
            numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = find_activation_nodes(model)
    assert [(a.name, a.kind, a.tensor, a.channels, a.rank) for a in layers] == [
        ("gelu", "gelu", "gelu", 4, 2),
        ("plain", "sigmoid", "plain", 4, 2),
        ("after", "relu", "after", 4, 2),
    ]


def test_declared_layers_must_exist_in_the_graph(tiny_cnn_path: Path) -> None:
    model = onnx.load(str(tiny_cnn_path))
    bogus = ActivationLayer(name="ghost", kind="relu", channels=4, tensor="no/such/tensor")
    with pytest.raises(ValueError, match="no/such/tensor"):
        find_activation_nodes(model, [bogus])


def test_statistics_reorder_each_activation_at_most_once(tmp_path: Path) -> None:
    """onnxruntime's NCHWc transform copies a blocked activation back to NCHW for each
    consumer that is not layout-aware; the statistics read one (N, C, positions) view of it,
    so each layer costs at most one full-size ReorderOutput (the rest reorder pooled
    (N, C, 1) results or their Concat)."""
    model = make_onnx_cnn(activations=("relu", "relu"), channels=(16, 32), with_metadata=False)
    layers = find_activation_nodes(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(
        instrument_model(model, layers).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    producers = {out: node for node in optimized.graph.node for out in node.output}
    reorders = [n for n in optimized.graph.node if n.op_type == "ReorderOutput"]
    if not any(n.domain.endswith("nchwc") for n in optimized.graph.node):
        pytest.skip("no NCHWc transform on this CPU")
    full = [
        n for n in reorders
        if producers[n.input[0]].op_type not in ("GlobalAveragePool", "GlobalMaxPool", "Concat")
    ]  # fmt: skip
    assert len(full) <= len(layers)


def test_declared_channel_count_must_match_the_graph(tiny_cnn_path: Path) -> None:
    model = onnx.load(str(tiny_cnn_path))
    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    wrong = metadata.activations[0].model_copy(update={"channels": 5})
    with pytest.raises(ValueError, match="has 5 channels, the graph's tensor"):
        find_activation_nodes(model, [wrong, *metadata.activations[1:]])
