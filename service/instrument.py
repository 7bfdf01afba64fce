"""Activation statistics computed inside the ONNX graph, next to the activations.

``find_activation_nodes`` lists a graph's activation layers (ours from the metadata, a foreign
model's from its nodes); ``instrument_model`` returns a copy of the model with a few reduction
nodes after each activation output Y and extra graph outputs ``stats/<layer>/<stat>``, each
of shape (N, C): per sample, per channel. ``summarize_layer`` aggregates those small arrays
over the batch in numpy. Nothing here imports torch.

Why these formulations (measured with onnxruntime 1.32 on this 2-core AVX-512 machine, see
``bench/bench_stats_overhead.py``): onnxruntime's NCHWc transformer keeps convolution outputs
in a blocked layout; a consumer that is not layout-aware gets a ``ReorderOutput`` (a full copy
of Y) inserted before it. Layout-aware in 1.32, read from the optimized graph
(``SessionOptions.optimized_model_filepath``): GlobalAveragePool, GlobalMaxPool, HardSigmoid,
Relu/Sigmoid/Tanh, and Add/Mul of two same-shape blocked tensors (so ``Mul(Y, Y)``). Not
layout-aware: Clip, Neg, Sign, Ceil, Less, and Mul by a constant. Hence:

- active rate   = GlobalAveragePool(HardSigmoid(Y, alpha=2**127, beta=0)). HardSigmoid is
  max(0, min(1, alpha*y + beta)): 0 for y <= 0, exactly 1 for every y >= 2**-127 (the
  product is >= 1, or +inf, before the clamp), so the test y > 0 is exact for all normal
  float32 values (>= 2**-126 ~ 1.2e-38) and half of the subnormal range. The 1e30 factor of
  ``Clip(Mul(y, 1e30), 0, 1)`` is not enough (1e-35 * 1e30 = 1e-5), and Clip and Mul by a
  constant are not layout-aware here.
- max           = GlobalMaxPool(Y); dead channels are taken from it (max <= 0 over the batch),
  which is exact for every float, subnormals included.
- mean          = GlobalAveragePool(Y); mean of squares = GlobalAveragePool(Mul(Y, Y)).
- min           = -GlobalMaxPool(Neg(Y)), except for relu and relu6 where Y >= 0: there the
  minimum is exactly 0 as soon as one element is inactive, which the active rates show, so
  no graph output is spent on it (``needs_min_output``). The caller handles the rare batch
  in which a ReLU layer has no zero at all (``LoadedModel`` fetches that layer's raw output).
- saturated     = mean of Cast(Less(y * (1 - y), 0.0025)) for sigmoid (derivative below 1% of
  its peak 0.25) and Cast(Less(1 - y * y, 0.01)) for tanh (peak 1): the same float32
  expressions as the test oracle, so the comparison is exact. Not layout-aware, but these are
  the baselines, not the activations this service is about.

Rank-2 activations (N, C) (dense layers) are already per sample and channel: their outputs
are Identity/Greater/Mul of Y itself. All outputs are flattened to (N, C).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metadata import ACTIVATION_KINDS, SATURATING_KINDS, ActivationLayer

log = logging.getLogger(__name__)

STATS_PREFIX = "stats/"
# Statistics each layer exposes as (N, C) graph outputs; "saturated" only for sigmoid/tanh,
# "min" only where the kind does not make it structural (see needs_min_output).
STAT_NAMES = ("active", "max", "mean", "meansq", "min", "saturated")

# ONNX op -> our kind name. Clip is relu6 only with bounds (0, 6); other Clip nodes are "clip".
_OP_TO_KIND = {op: kind for kind, op in ACTIVATION_KINDS.items() if op != "Clip"}
# Foreign activation ops we also observe; their kind is the op name.
_EXTRA_OPS = frozenset(
    {"HardSigmoid", "HardSwish", "Selu", "Celu", "Softplus", "Gelu", "ThresholdedRelu", "Mish"}
)
ACTIVATION_OPS = frozenset(ACTIVATION_KINDS.values()) | _EXTRA_OPS
# Kinds whose output is >= 0 with exact zeros for inactive units: min is structural.
NONNEGATIVE_KINDS = frozenset({"relu", "relu6"})

# 2**127: the largest power of two a float32 holds; see the module docstring.
_ACTIVE_SCALE = float(2.0**127)
_SIGMOID_SATURATION = 0.0025  # 1% of sigmoid's peak derivative s(1-s) = 0.25
_TANH_SATURATION = 0.01  # 1% of tanh's peak derivative 1 - y^2 = 1


@dataclass(frozen=True)
class ActivationNode:
    """One activation layer found in (or declared for) a graph."""

    name: str  # layer name: ours from the metadata, a foreign model's node or tensor name
    kind: str  # ACTIVATION_KINDS name where one fits, else the ONNX op name ("Gelu", "clip")
    op_type: str
    tensor: str  # the activation's output tensor
    channels: int
    rank: int  # rank of the output tensor: 2 (N, C) or >= 3 (N, C, ...)
    node: str = ""

    @property
    def saturating(self) -> bool:
        """Whether the saturated fraction applies (sigmoid, tanh)."""
        return self.kind in SATURATING_KINDS

    @property
    def needs_min_output(self) -> bool:
        """Whether the graph computes the minimum (not structural for this kind)."""
        return self.kind not in NONNEGATIVE_KINDS

    def to_layer(self) -> ActivationLayer:
        """The metadata form of this layer."""
        return ActivationLayer(
            name=self.name, kind=self.kind, channels=self.channels, tensor=self.tensor,
            node=self.node,
        )  # fmt: skip


def stat_output_name(layer: str, stat: str) -> str:
    """Graph output name of one statistic of one layer, e.g. ``stats/features.0.act/active``."""
    return f"{STATS_PREFIX}{layer}/{stat}"


def stat_outputs(layer: ActivationNode) -> list[str]:
    """The statistics the instrumented graph exposes for ``layer``."""
    stats = ["active", "max", "mean", "meansq"]
    if layer.needs_min_output:
        stats.append("min")
    if layer.saturating:
        stats.append("saturated")
    return stats


def _constant_value(graph: onnx.GraphProto, name: str) -> float | None:
    """Scalar value of an initializer or Constant-node output, or None."""
    if not name:
        return None
    for init in graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    return float(arr.reshape(-1)[0]) if arr.size == 1 else None
                if attr.name == "value_float":
                    return float(attr.f)
    return None


def _clip_kind(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    """relu6 for Clip(0, 6) (inputs since opset 11, attributes before), else clip."""
    attrs = {a.name: a.f for a in node.attribute}
    lo = attrs.get("min", _constant_value(graph, node.input[1]) if len(node.input) > 1 else None)
    hi = attrs.get("max", _constant_value(graph, node.input[2]) if len(node.input) > 2 else None)
    return "relu6" if lo == 0.0 and hi == 6.0 else "clip"


def _kind_of(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    if node.op_type == "Clip":
        return _clip_kind(graph, node)
    return _OP_TO_KIND.get(node.op_type, node.op_type)


def _as_model(model_or_graph: onnx.ModelProto | onnx.GraphProto) -> onnx.ModelProto:
    if isinstance(model_or_graph, onnx.ModelProto):
        return model_or_graph
    return helper.make_model(model_or_graph)


def infer_tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shapes of every tensor shape inference can reach; a dynamic batch is fixed to 1 first
    so that shapes that depend on it (Reshape targets) still resolve."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for inp in probe.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as exc:  # a foreign graph shape inference cannot follow
        log.warning("shape inference failed (%s); activation channels unknown", exc)
        return {}
    shapes: dict[str, list[int | str | None]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in info.type.tensor_type.shape.dim
        ]
    return shapes


def find_activation_nodes(
    model: onnx.ModelProto | onnx.GraphProto,
    declared: Iterable[ActivationLayer] | None = None,
) -> list[ActivationNode]:
    """Every activation layer of the graph, in graph order.

    With ``declared`` (our metadata's ``activations``) the layers are those, with their names
    and kinds, and each declared tensor must exist in the graph. Without it, every activation
    node (Relu, LeakyRelu, PRelu, Elu, Clip, Sigmoid, Tanh and a few more) whose output is not
    a graph output and whose channel count shape inference finds becomes a layer, named after
    its node (or its output tensor when the node has no name).
    """
    model = _as_model(model)
    graph = model.graph
    shapes = infer_tensor_shapes(model)
    producers = {out: node for node in graph.node for out in node.output}
    if declared is not None:
        layers = []
        for layer in declared:
            node = producers.get(layer.tensor)
            if node is None:
                raise ValueError(
                    f"metadata names activation tensor {layer.tensor!r} (layer {layer.name!r}) "
                    "that no node of the graph produces"
                )
            shape = shapes.get(layer.tensor)
            rank = len(shape) if shape else 4
            layers.append(
                ActivationNode(
                    name=layer.name,
                    kind=layer.kind,
                    op_type=node.op_type,
                    tensor=layer.tensor,
                    channels=layer.channels,
                    rank=rank,
                    node=node.name,
                )  # fmt: skip
            )
        return layers

    graph_outputs = {o.name for o in graph.output}
    found: list[ActivationNode] = []
    names: set[str] = set()
    for node in graph.node:
        if node.op_type not in ACTIVATION_OPS or node.domain not in ("", "ai.onnx"):
            continue
        tensor = node.output[0]
        if tensor in graph_outputs:
            continue  # a sigmoid producing the model's output is the head, not a hidden layer
        shape = shapes.get(tensor)
        channels = shape[1] if shape and len(shape) >= 2 else None
        if not isinstance(channels, int) or channels <= 0:
            log.warning(
                "activation %s (%s): channel count unknown; not observed", tensor, node.op_type
            )
            continue
        name = node.name or tensor
        if name in names:
            name = tensor
        names.add(name)
        found.append(
            ActivationNode(
                name=name,
                kind=_kind_of(graph, node),
                op_type=node.op_type,
                tensor=tensor,
                channels=channels,
                rank=len(shape),
                node=node.name,
            )  # fmt: skip
        )
    return found


class _GraphBuilder:
    """Appends nodes and constants with names under ``stats/`` that cannot collide."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants: dict[str, str] = {}

    def const(self, value: float) -> str:
        name = f"{STATS_PREFIX}const/{value!r}"
        if name not in self.constants:
            self.graph.initializer.append(
                numpy_helper.from_array(np.array(value, dtype=np.float32), name)
            )
            self.constants[name] = name
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.graph.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _add_layer_stats(b: _GraphBuilder, layer: ActivationNode) -> list[str]:
    """Add the statistic nodes of one layer; returns the new (N, C) graph outputs."""
    y = layer.tensor
    pre = f"{STATS_PREFIX}{layer.name}/"
    if layer.rank >= 3:
        active = b.node("HardSigmoid", [y], pre + "_indicator", alpha=_ACTIVE_SCALE, beta=0.0)
        pooled = {
            "active": b.node("GlobalAveragePool", [active], pre + "_active"),
            "max": b.node("GlobalMaxPool", [y], pre + "_max"),
            "mean": b.node("GlobalAveragePool", [y], pre + "_mean"),
            "meansq": b.node(
                "GlobalAveragePool", [b.node("Mul", [y, y], pre + "_sq")], pre + "_meansq"
            ),
        }
        if layer.needs_min_output:
            neg_max = b.node("GlobalMaxPool", [b.node("Neg", [y], pre + "_neg")], pre + "_negmax")
            pooled["min"] = b.node("Neg", [neg_max], pre + "_min")
    else:
        positive = b.node("Greater", [y, b.const(0.0)], pre + "_positive")
        pooled = {
            "active": b.node("Cast", [positive], pre + "_active", to=TensorProto.FLOAT),
            "max": b.node("Identity", [y], pre + "_max"),
            "mean": b.node("Identity", [y], pre + "_mean"),
            "meansq": b.node("Mul", [y, y], pre + "_meansq"),
        }
        if layer.needs_min_output:
            pooled["min"] = b.node("Identity", [y], pre + "_min")
    if layer.saturating:
        one = b.const(1.0)
        if layer.kind == "sigmoid":
            deriv = b.node("Mul", [y, b.node("Sub", [one, y], pre + "_1my")], pre + "_deriv")
            limit = b.const(_SIGMOID_SATURATION)
        else:
            deriv = b.node("Sub", [one, b.node("Mul", [y, y], pre + "_y2")], pre + "_deriv")
            limit = b.const(_TANH_SATURATION)
        flags = b.node(
            "Cast", [b.node("Less", [deriv, limit], pre + "_sat_bool")], pre + "_sat",
            to=TensorProto.FLOAT,
        )  # fmt: skip
        if layer.rank >= 3:
            pooled["saturated"] = b.node("GlobalAveragePool", [flags], pre + "_saturated")
        else:
            pooled["saturated"] = flags
    outputs = []
    for stat in stat_outputs(layer):
        out = stat_output_name(layer.name, stat)
        # (N, C, 1, 1) -> (N, C); for rank 2 this is a cheap copy under the public name.
        b.node("Flatten", [pooled[stat]], out, axis=1)
        outputs.append(out)
    return outputs


def instrument_model(model: onnx.ModelProto, layers: Iterable[ActivationNode]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs, per layer, the (N, C) statistics
    ``stats/<layer>/<stat>`` (see ``stat_outputs``); the original outputs come first, unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    builder = _GraphBuilder(out.graph)
    for layer in layers:
        for name in _add_layer_stats(builder, layer):
            out.graph.output.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, layer.channels])
            )
    return out


@dataclass
class LayerStats:
    """Statistics of one activation layer over one batch (see SPEC "Activation statistics")."""

    name: str
    kind: str
    channels: int
    inactive_fraction: float  # share of elements with y <= 0
    dead_units: int  # channels with no active element in any sample and position
    dead_channels: list[int]
    mean: float
    std: float | None  # None if y*y overflowed float32 in the graph (|y| > 1.8e19)
    min: float | None  # None only if neither structural nor measurable (see LoadedModel)
    max: float
    saturated_fraction: float | None = None  # sigmoid and tanh only
    channel_activity: list[float] | None = None  # per channel active share; "channels" only
    samples: int = 0

    def to_dict(self) -> dict:
        """Plain JSON-ready form."""
        return {k: v for k, v in self.__dict__.items() if k != "channel_activity" or v is not None}


@dataclass
class LayerArrays:
    """The (N, C) arrays one layer's statistics come from."""

    active: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    meansq: np.ndarray
    min: np.ndarray | None = None
    saturated: np.ndarray | None = None


def layer_arrays(layer: ActivationNode, outputs: Mapping[str, np.ndarray]) -> LayerArrays:
    """Pick one layer's (N, C) arrays out of a run's named outputs."""
    get = {stat: outputs.get(stat_output_name(layer.name, stat)) for stat in STAT_NAMES}
    return LayerArrays(
        active=get["active"], max=get["max"], mean=get["mean"], meansq=get["meansq"],
        min=get["min"], saturated=get["saturated"],
    )  # fmt: skip


def structural_min(layer: ActivationNode, arrays: LayerArrays) -> float | None:
    """The batch minimum when the kind makes it known without a graph output, else None.

    For relu and relu6, y >= 0 and inactive elements are exactly 0, so the minimum is 0 as
    soon as one (sample, channel) has an active rate below 1.
    """
    if layer.kind in NONNEGATIVE_KINDS and bool((arrays.active < 1.0).any()):
        return 0.0
    return None


def summarize_layer(
    layer: ActivationNode,
    arrays: LayerArrays,
    *,
    batch_min: float | None = None,
    channels: bool = False,
) -> LayerStats:
    """Aggregate one layer's (N, C) arrays over the batch, in float64.

    Every (sample, channel) pools the same number of positions, so plain means over (N, C)
    are the means over all elements. The variance is E[y^2] - E[y]^2 from float32 per-group
    moments: its absolute error is about 3e-7 * E[y^2] (float32 pooling), i.e. a relative std
    error of ~1.5e-7 * (1 + mean^2 / var), well below 1e-5 unless the layer is nearly constant.
    ``batch_min`` gives the minimum when the caller measured it from the raw output (ReLU
    layers without a single zero in the batch; see ``structural_min``).
    """
    active = arrays.active.astype(np.float64)  # (N, C)
    n = active.shape[0]
    channel_activity = active.mean(axis=0)  # (C,)
    channel_max = arrays.max.max(axis=0)  # (C,)
    dead = np.flatnonzero(channel_max <= 0)  # exact: no y > 0 anywhere in the batch
    mean = float(arrays.mean.astype(np.float64).mean())
    meansq = float(arrays.meansq.astype(np.float64).mean())
    var = max(meansq - mean * mean, 0.0)
    if batch_min is None:
        batch_min = structural_min(layer, arrays)
    if batch_min is None and arrays.min is not None:
        batch_min = float(arrays.min.min())
    saturated = None
    if arrays.saturated is not None:
        saturated = float(arrays.saturated.astype(np.float64).mean())
    return LayerStats(
        name=layer.name,
        kind=layer.kind,
        channels=layer.channels,
        inactive_fraction=float(1.0 - channel_activity.mean()),
        dead_units=int(dead.size),
        dead_channels=dead.tolist(),
        mean=mean,
        std=float(np.sqrt(var)) if np.isfinite(var) else None,
        min=None if batch_min is None else float(batch_min),
        max=float(channel_max.max()),
        saturated_fraction=saturated,
        channel_activity=channel_activity.tolist() if channels else None,
        samples=n,
    )
