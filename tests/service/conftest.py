"""Shared fixtures for the service tests: tiny ONNX classifiers built with ``onnx.helper``.

Nothing here imports torch or the service's own runtime code, so the fixtures work on their
own and stay an independent oracle: ``numpy_layer_stats`` computes the statistics the service
must reproduce, from raw activation tensors that ``run_with_activations`` fetches.

Fixture names are stable (the HTTP tests depend on them): ``tiny_cnn_path``, ``model_repo``,
``dead_channel_model_path``; helpers: ``make_onnx_cnn``, ``save_model``, ``reference_inputs``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.metadata import (
    ACTIVATION_KINDS,
    SATURATING_KINDS,
    ActivationLayer,
    LayerProfile,
    ModelMetadata,
    Preprocessing,
    ReferenceProfile,
)

OPSET = 17
# onnxruntime 1.2x-1.3x reads IR version 10; pin it so files built with a newer onnx still load.
IR_VERSION = 10
TINY_LABELS = [str(i) for i in range(10)]
TINY_MEAN = 0.5
TINY_STD = 0.25


def reference_inputs(
    n: int, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0, *, inverted: bool = False
) -> np.ndarray:
    """Seeded, normalised images from the 'reference distribution': mostly dark pixels.

    Pixels are ``u**3`` for uniform ``u`` (mean 0.25, skewed to black like digits), so the
    inverted images ``1 - x`` (mean 0.75) are clearly a different distribution, which the
    drift tests rely on. Normalised with the tiny model's mean/std: (N, *shape) float32.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.random((n, *shape)) ** 3
    if inverted:
        pixels = 1.0 - pixels
    return ((pixels - TINY_MEAN) / TINY_STD).astype(np.float32)


def _activation_node(
    kind: str, x: str, y: str, name: str, channels: int, rank: int, rng: np.random.Generator
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """One activation node of our kind ``kind`` and the initializers it needs."""
    op = ACTIVATION_KINDS[kind]
    inits: list[onnx.TensorProto] = []
    if kind == "leaky_relu":
        return helper.make_node(op, [x], [y], name=name, alpha=0.1), inits
    if kind == "elu":
        return helper.make_node(op, [x], [y], name=name, alpha=1.0), inits
    if kind == "prelu":
        # One slope per channel, broadcast against (N, C, H, W) as (C, 1, 1), like torch exports.
        slope_shape = (channels, 1, 1) if rank == 4 else (channels,)
        slope = (0.25 + 0.05 * rng.standard_normal(slope_shape)).astype(np.float32)
        inits.append(numpy_helper.from_array(slope, f"{name}.slope"))
        return helper.make_node(op, [x, f"{name}.slope"], [y], name=name), inits
    if kind == "relu6":
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), f"{name}.min"))
        inits.append(numpy_helper.from_array(np.array(6.0, np.float32), f"{name}.max"))
        return helper.make_node(op, [x, f"{name}.min", f"{name}.max"], [y], name=name), inits
    return helper.make_node(op, [x], [y], name=name), inits


def make_onnx_cnn(
    *,
    activations: tuple[str, ...] = ("relu", "relu"),
    channels: tuple[int, ...] = (4, 8),
    in_channels: int = 1,
    image_size: tuple[int, int] = (8, 8),
    num_classes: int = 10,
    hidden: int | None = None,
    hidden_activation: str = "relu",
    input_name: str = "input",
    output_name: str = "logits",
    softmax: bool = False,
    dead_channels: tuple[int, ...] = (),
    seed: int = 0,
    with_metadata: bool = True,
    name: str = "tiny",
    labels: list[str] | None = None,
    reference_samples: int = 64,
) -> onnx.ModelProto:
    """A small CNN: [Conv3x3 -> act] per entry of ``activations`` -> GlobalAveragePool ->
    Flatten -> [Gemm -> act if ``hidden``] -> Gemm (-> Softmax if ``softmax``).

    Input ``input_name`` float32 (N, in_channels, H, W) with a dynamic batch axis; output
    ``output_name`` (N, num_classes). ``dead_channels`` lists output channels of the first
    conv whose weights are zero and bias negative: after a ReLU they never fire. With
    ``with_metadata`` the file carries our ModelMetadata, including a reference profile
    measured on ``reference_inputs``.
    """
    if len(channels) != len(activations):
        raise ValueError("channels and activations need the same length")
    rng = np.random.default_rng(seed)
    height, width = image_size
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    layers: list[ActivationLayer] = []
    x = input_name
    c_in = in_channels
    for i, (kind, c_out) in enumerate(zip(activations, channels, strict=True)):
        # He-style init keeps roughly half of the units active on normalised inputs.
        w = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))
        b = 0.1 * rng.standard_normal(c_out)
        if i == 0:
            for dead in dead_channels:
                w[dead] = 0.0
                b[dead] = -1.0
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"conv{i}.weight"),
            numpy_helper.from_array(b.astype(np.float32), f"conv{i}.bias"),
        ]
        conv_out = f"/features.{i}/conv/Conv_output_0"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.weight", f"conv{i}.bias"],
                [conv_out],
                name=f"/features.{i}/conv/Conv",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        op = ACTIVATION_KINDS[kind]
        act_out = f"/features.{i}/act/{op}_output_0"
        node, extra = _activation_node(
            kind, conv_out, act_out, f"/features.{i}/act/{op}", c_out, 4, rng
        )
        nodes.append(node)
        inits += extra
        layers.append(
            ActivationLayer(
                name=f"features.{i}.act", kind=kind, channels=c_out, tensor=act_out, node=node.name
            )
        )
        x, c_in = act_out, c_out

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["/pool/GlobalAveragePool_output_0"]))
    nodes.append(
        helper.make_node(
            "Flatten", ["/pool/GlobalAveragePool_output_0"], ["/flatten/Flatten_output_0"], axis=1
        )
    )
    x = "/flatten/Flatten_output_0"
    if hidden:
        w = rng.standard_normal((hidden, c_in)) * np.sqrt(2.0 / c_in)
        inits += [
            numpy_helper.from_array(w.astype(np.float32), "hidden.weight"),
            numpy_helper.from_array(
                (0.1 * rng.standard_normal(hidden)).astype(np.float32), "hidden.bias"
            ),
        ]
        nodes.append(
            helper.make_node(
                "Gemm", [x, "hidden.weight", "hidden.bias"], ["/hidden/Gemm_output_0"], transB=1
            )
        )
        op = ACTIVATION_KINDS[hidden_activation]
        act_out = f"/hidden_act/{op}_output_0"
        node, extra = _activation_node(
            hidden_activation,
            "/hidden/Gemm_output_0",
            act_out,
            f"/hidden_act/{op}",
            hidden,
            2,
            rng,
        )
        nodes.append(node)
        inits += extra
        layers.append(
            ActivationLayer(
                name="hidden_act",
                kind=hidden_activation,
                channels=hidden,
                tensor=act_out,
                node=node.name,
            )
        )
        x, c_in = act_out, hidden

    w = rng.standard_normal((num_classes, c_in)) * np.sqrt(1.0 / c_in)
    inits += [
        numpy_helper.from_array(w.astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias"),
    ]
    logits = "/fc/Gemm_output_0" if softmax else output_name
    nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], [logits], transB=1))
    if softmax:
        nodes.append(helper.make_node("Softmax", [logits], [output_name], axis=1))

    graph = helper.make_graph(
        nodes,
        f"{name}_graph",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.FLOAT, ["N", in_channels, height, width]
            )
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", num_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests.conftest"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    if not with_metadata:
        return model

    x_ref = reference_inputs(reference_samples, (in_channels, height, width), seed=1234)
    raw = run_with_activations(model, x_ref, [layer.tensor for layer in layers])
    profiles = {}
    for layer in layers:
        stats = numpy_layer_stats(raw[layer.tensor], layer.kind)
        profiles[layer.name] = LayerProfile(
            inactive_fraction=stats["inactive_fraction"],
            channel_activity=stats["channel_activity"].tolist(),
            dead_units=stats["dead_units"],
            saturated_fraction=stats["saturated_fraction"],
            mean=stats["mean"],
            std=stats["std"],
        )
    metadata = ModelMetadata(
        name=name,
        architecture="test_cnn",
        activation=activations[0],
        labels=labels or [str(i) for i in range(num_classes)],
        input_name=input_name,
        output_name=output_name,
        preprocessing=Preprocessing(
            height=height,
            width=width,
            channels=in_channels,
            mean=[TINY_MEAN] * in_channels,
            std=[TINY_STD] * in_channels,
        ),
        activations=layers,
        reference=ReferenceProfile(samples=reference_samples, layers=profiles),
        training={"data": "none (random weights, test fixture)"},
    )
    helper.set_model_props(model, {"relu_serve.model": metadata.to_json()})
    return model


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path``, creating parent folders; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def run_with_activations(
    model: onnx.ModelProto, x: np.ndarray, tensors: list[str], *, optimize: bool = True
) -> dict[str, np.ndarray]:
    """Run a copy of ``model`` with ``tensors`` added as graph outputs; returns all outputs.

    With ``optimize`` (the default) onnxruntime optimizes the graph as the service does, so
    the activations come from the same kernels (Conv fused with its activation, NCHWc) and
    differ from the service's only where the statistics differ; unoptimized kernels sum in
    another order and move values by an ulp.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in existing:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(
        copy.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: x})
    return dict(zip(names, values, strict=True))


def numpy_layer_stats(y: np.ndarray, kind: str) -> dict:
    """The statistics of one activation output Y (N, C, ...) computed in numpy: the oracle.

    active: y > 0; a dead channel has no active element in the whole batch; saturated:
    derivative below 1% of its peak (sigmoid s(1-s) < 0.0025, tanh 1 - y^2 < 0.01).
    """
    n, c = y.shape[:2]
    per_channel = y.reshape(n, c, -1)  # (N, C, HW)
    active = (per_channel > 0).mean(axis=2, dtype=np.float64)  # (N, C)
    channel_activity = active.mean(axis=0)  # (C,)
    y64 = y.astype(np.float64)
    saturated = None
    if kind in SATURATING_KINDS or kind in ("Sigmoid", "Tanh"):
        if kind in ("sigmoid", "Sigmoid"):
            sat = y * (np.float32(1) - y) < np.float32(0.0025)
        else:
            sat = np.float32(1) - y * y < np.float32(0.01)
        saturated = float(sat.mean())
    dead = np.flatnonzero(channel_activity == 0)
    return {
        "per_sample_active": active,
        "channel_activity": channel_activity,
        "inactive_fraction": float(1.0 - channel_activity.mean()),
        "dead_units": int(dead.size),
        "dead_channels": dead.tolist(),
        "mean": float(y64.mean()),
        "std": float(y64.std()),
        "min": float(y64.min()),
        "max": float(y64.max()),
        "saturated_fraction": saturated,
    }


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime offers the CPU provider alone, as on a machine without a GPU (the fall-back
    tests then test the fall-back on GPU machines too)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty session folder that ``tiny_cnn_path`` and ``model_repo`` fill."""
    return tmp_path_factory.mktemp("repo") / "models"


@pytest.fixture(scope="session")
def tiny_cnn_path(models_root: Path) -> Path:
    """``models/tiny/1/model.onnx``: 1x8x8 input "input", Conv-Relu-Conv-Relu-GAP-Gemm, 10
    classes, with our metadata and a reference profile."""
    return save_model(make_onnx_cnn(name="tiny", seed=0), models_root / "tiny" / "1" / "model.onnx")


@pytest.fixture(scope="session")
def foreign_model_path(models_root: Path) -> Path:
    """``models/foreign/1/model.onnx``: no metadata, input "x" (N, 3, 16, 16), LeakyRelu and
    Sigmoid activations, 5 classes, output "output"."""
    model = make_onnx_cnn(
        activations=("leaky_relu", "sigmoid"),
        channels=(6, 5),
        in_channels=3,
        image_size=(16, 16),
        num_classes=5,
        input_name="x",
        output_name="output",
        seed=7,
        with_metadata=False,
    )
    return save_model(model, models_root / "foreign" / "1" / "model.onnx")


@pytest.fixture(scope="session")
def model_repo(models_root: Path, tiny_cnn_path: Path, foreign_model_path: Path) -> Path:
    """The ``models`` root: tiny/1, tiny/2 (a copy of tiny/1) and foreign/1. Read-only:
    tests that change a repository copy it first."""
    version2 = models_root / "tiny" / "2" / "model.onnx"
    version2.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_cnn_path, version2)
    return models_root


@pytest.fixture(scope="session")
def dead_channel_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (with metadata) whose first ReLU layer's channel 0 is dead on purpose:
    its conv weights are zero and its bias -1."""
    model = make_onnx_cnn(name="dead", seed=3, dead_channels=(0,))
    return save_model(model, tmp_path_factory.mktemp("dead") / "dead" / "1" / "model.onnx")


# Activation node names as torch's legacy exporter writes them: a leading '/', and a double
# one as a nested module's empty name gives; v2 statistics outputs use them made clean.
LEGACY_LAYER_NAMES = ("/relu/Relu", "/block//act/Relu")
EMBEDDING = "embedding"


@pytest.fixture(scope="session")
def two_output_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``twohead/1/model.onnx``: a foreign model (no metadata) with two outputs, "logits"
    (N, 10) and "embedding" (N, 8), the pooled features; its two ReLU nodes carry the legacy
    exporter's names ``LEGACY_LAYER_NAMES``."""
    model = make_onnx_cnn(name="twohead", seed=5, with_metadata=False)
    acts = [node for node in model.graph.node if node.op_type == "Relu"]
    for node, name in zip(acts, LEGACY_LAYER_NAMES, strict=True):
        node.name = name
    model.graph.node.append(
        helper.make_node("Identity", ["/flatten/Flatten_output_0"], [EMBEDDING])
    )
    model.graph.output.append(
        helper.make_tensor_value_info(EMBEDDING, onnx.TensorProto.FLOAT, ["N", 8])
    )
    onnx.checker.check_model(model, full_check=True)
    root = tmp_path_factory.mktemp("twohead") / "models"
    return save_model(model, root / "twohead" / "1" / "model.onnx")
