"""Activation statistics computed inside the ONNX graph, next to the activations.

``find_activation_nodes`` lists a graph's activation layers (ours from the metadata, a foreign
model's from its nodes); ``instrument_model`` returns a copy of the model with a few reduction
nodes after each activation output Y, giving per sample and per channel values, packed into
one extra graph output per statistic, ``stats/<stat>`` of shape (N, sum of C) with the
columns ``StatsLayout`` gives. ``summarize_layers`` aggregates those small arrays over the
batch in numpy. Nothing here imports torch.

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

Rank-2 activations (N, C) (dense layers) are already per sample and channel: their values
are Y itself, Greater(Y, 0) and Y*Y, reshaped to (N, C, 1, 1) to join the Concat.

Cost and what did not help (ResNet-20, batch 32, 2 threads, onnxruntime 1.32, measured
with paired runs): per ReLU layer the statistics read Y four times and write two Y-sized
temporaries (the indicator, the squares); a pooling pass over a 2 MiB activation takes
~20 us, an elementwise pass (read + write) ~55-70 us, HardSigmoid, Mul, Relu and Add alike.
The two writes are most of the cost, and each is the only exact layout-aware way to get its
statistic (an exact count and a sum of squares cannot come out of one elementwise pass and
one sum). Tried and dropped:
- ``GlobalLpPool(Y, p=2)`` for the sum of squares: not layout-aware here, so onnxruntime
  reorders every activation back to NCHW (76 ReorderOutput nodes): 6.7x the plain model;
  ``ReduceSumSquare(Y, axes=[2, 3])`` likewise: 1.63x against 1.22x (batch 20).
- One GlobalAveragePool over ``Concat([Y, Y*Y])`` (or with the indicator): the Concat copies
  its inputs, costing more than the pooling pass it saves (1.52x vs 1.40x, same run; with the
  indicator too, 1.35x vs 1.22-1.26x at batch 20, and 9% fewer requests/s at 64 clients).
- Any order of a layer's statistic nodes (onnxruntime runs them in the order they are
  appended here, not in the order of the packed output): no measurable difference.
- ORT_ENABLE_EXTENDED instead of ALL: no NCHWc transform, the model itself runs ~2x slower.
What did help: letting onnxruntime's intra-op threads spin during a run
(``service.runtime.session_options``). With spinning off, every parallelised node woke the
second thread through the kernel, and the statistics add ~115 small nodes: on/off measured
1.33-1.40 at two threads, 1.18 at one. Spinning during the run and stopping when it returns
(``session.force_spinning_stop``): 1.20 at two threads (batch 32; profile: the pooling
nodes ~35%, the indicators and squares ~50%, the packing Concat/reorder the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metadata import ACTIVATION_KINDS, SATURATING_KINDS, ActivationLayer

log = logging.getLogger(__name__)

STATS_PREFIX = "stats/"
STATS_OUTPUT = "stats/packed"  # the one extra graph output: (N, StatsLayout.width)
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


def layer_stat_names(layer: ActivationNode) -> list[str]:
    """The statistics the instrumented graph computes for ``layer``, in packed order."""
    stats = ["active", "max", "mean", "meansq"]
    if layer.needs_min_output:
        stats.append("min")
    if layer.saturating:
        stats.append("saturated")
    return stats


@dataclass(frozen=True)
class StatsLayout:
    """Where each (layer, statistic) sits in the one packed output ``stats/packed``.

    The instrumented graph concatenates every layer's (N, C) statistics along the channel
    axis, layer by layer ([active, max, mean, meansq, (min), (saturated)] of layer 0, then
    layer 1, ...), into a single (N, width) output. Why one output in layer order:
    onnxruntime schedules nodes by a depth-first walk back from each graph output, so this
    runs every layer's statistic nodes right after the convolution that produced the layer,
    while it is still in cache. With one output per statistic most of them ran after the
    whole network, re-reading every activation from memory: ResNet-20, batch 32, went from
    1.53x to 1.34x of the plain model with this layout (same nodes otherwise).
    """

    blocks: dict[tuple[str, str], slice]  # (layer, stat) -> columns of the packed output
    width: int
    # Per statistic: packed columns of all layers having it (gathered in numpy), and each
    # layer's slice within that gathered array.
    index: dict[str, np.ndarray]
    columns: dict[str, dict[str, slice]]
    starts: dict[str, np.ndarray]  # stat -> each layer's first column in the gathered array
    sizes: dict[str, np.ndarray]  # stat -> each layer's channel count
    layer_positions: dict[str, list[int]]  # stat -> positions of the layers that have it

    @classmethod
    def of(cls, layers: Iterable[ActivationNode]) -> StatsLayout:
        """The layout ``instrument_model`` produces for ``layers``."""
        blocks: dict[tuple[str, str], slice] = {}
        gathered: dict[str, list[np.ndarray]] = {}
        columns: dict[str, dict[str, slice]] = {}
        positions: dict[str, list[int]] = {}
        width = 0
        for position, layer in enumerate(layers):
            for stat in layer_stat_names(layer):
                positions.setdefault(stat, []).append(position)
                blocks[(layer.name, stat)] = slice(width, width + layer.channels)
                parts = gathered.setdefault(stat, [])
                start = sum(len(p) for p in parts)
                columns.setdefault(stat, {})[layer.name] = slice(start, start + layer.channels)
                parts.append(np.arange(width, width + layer.channels))
                width += layer.channels
        index = {stat: np.concatenate(parts) for stat, parts in gathered.items()}
        starts = {k: np.array([c.start for c in v.values()]) for k, v in columns.items()}
        sizes = {k: np.array([c.stop - c.start for c in v.values()]) for k, v in columns.items()}
        return cls(blocks, width, index, columns, starts, sizes, positions)

    @property
    def outputs(self) -> list[str]:
        """The statistic graph outputs (none for a model without activation layers)."""
        return [STATS_OUTPUT] if self.width else []

    def gather(self, packed: np.ndarray) -> dict[str, np.ndarray]:
        """Statistic -> (N, sum of C over the layers that have it), from the packed output."""
        return {stat: packed[:, idx] for stat, idx in self.index.items()}


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
            found = shape[1] if shape and len(shape) >= 2 else None
            if isinstance(found, int) and found != layer.channels:
                # The packed statistics are laid out by channel count: a wrong count would
                # shift every later layer's columns.
                raise ValueError(
                    f"metadata says layer {layer.name!r} has {layer.channels} channels, "
                    f"the graph's tensor {layer.tensor!r} has {found}"
                )
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
    """Appends nodes and constants under ``stats/``, renaming any a foreign graph already uses."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants: dict[str, str] = {}  # wanted name -> name in the graph
        self.taken = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        self.taken |= {out for node in graph.node for out in node.output}

    def _fresh(self, name: str) -> str:
        fresh, k = name, 1
        while fresh in self.taken:
            fresh, k = f"{name}#{k}", k + 1
        self.taken.add(fresh)
        return fresh

    def const(self, value: float | list[int]) -> str:
        if isinstance(value, list):
            name = f"{STATS_PREFIX}const/shape{'x'.join(map(str, value))}"
            array = np.array(value, dtype=np.int64)
        else:
            name = f"{STATS_PREFIX}const/{value!r}"
            array = np.array(value, dtype=np.float32)
        if name not in self.constants:
            self.constants[name] = self._fresh(name)
            self.graph.initializer.append(numpy_helper.from_array(array, self.constants[name]))
        return self.constants[name]

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        output = self._fresh(output)
        self.graph.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _add_layer_stats(b: _GraphBuilder, layer: ActivationNode) -> dict[str, str]:
    """Add the statistic nodes of one layer; returns stat -> (N, C, 1, 1) tensor."""
    y = layer.tensor
    pre = f"{STATS_PREFIX}{layer.name}/"
    if layer.rank >= 3:
        indicator = b.node("HardSigmoid", [y], pre + "indicator", alpha=_ACTIVE_SCALE, beta=0.0)
        pooled = {
            "active": b.node("GlobalAveragePool", [indicator], pre + "active"),
            "max": b.node("GlobalMaxPool", [y], pre + "max"),
            "mean": b.node("GlobalAveragePool", [y], pre + "mean"),
            "meansq": b.node(
                "GlobalAveragePool", [b.node("Mul", [y, y], pre + "sq")], pre + "meansq"
            ),
        }
        if layer.needs_min_output:
            neg_max = b.node("GlobalMaxPool", [b.node("Neg", [y], pre + "neg")], pre + "negmax")
            pooled["min"] = b.node("Neg", [neg_max], pre + "min")
    else:
        positive = b.node("Greater", [y, b.const(0.0)], pre + "positive")
        pooled = {
            "active": b.node("Cast", [positive], pre + "active", to=TensorProto.FLOAT),
            "max": y,
            "mean": y,
            "meansq": b.node("Mul", [y, y], pre + "meansq"),
        }
        if layer.needs_min_output:
            pooled["min"] = y
    if layer.saturating:
        one = b.const(1.0)
        if layer.kind == "sigmoid":
            deriv = b.node("Mul", [y, b.node("Sub", [one, y], pre + "1my")], pre + "deriv")
            limit = b.const(_SIGMOID_SATURATION)
        else:
            deriv = b.node("Sub", [one, b.node("Mul", [y, y], pre + "y2")], pre + "deriv")
            limit = b.const(_TANH_SATURATION)
        flags = b.node(
            "Cast", [b.node("Less", [deriv, limit], pre + "saturated_bool")], pre + "sat",
            to=TensorProto.FLOAT,
        )  # fmt: skip
        pooled["saturated"] = (
            b.node("GlobalAveragePool", [flags], pre + "saturated") if layer.rank >= 3 else flags
        )
    if layer.rank != 4:
        # (N, C), (N, C, 1) or (N, C, 1, 1, 1) -> (N, C, 1, 1), so all layers concatenate.
        shape = b.const([0, layer.channels, 1, 1])
        pooled = {
            stat: b.node("Reshape", [t, shape], f"{pre}{stat}_4d") for stat, t in pooled.items()
        }
    return pooled


def instrument_model(model: onnx.ModelProto, layers: Iterable[ActivationNode]) -> onnx.ModelProto:
    """A copy of ``model`` with one more output, ``stats/packed`` (N, width): per sample and
    channel, the statistics of ``layers`` laid out as ``StatsLayout.of(layers)`` says. The
    original outputs come first, unchanged; without layers the copy has no extra output."""
    layers = list(layers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not layers:
        return out
    builder = _GraphBuilder(out.graph)
    if STATS_OUTPUT in builder.taken:
        raise ValueError(f"the graph already has a tensor named {STATS_OUTPUT!r}")
    packed = []
    for layer in layers:
        pooled = _add_layer_stats(builder, layer)
        packed += [pooled[stat] for stat in layer_stat_names(layer)]
    # Concat of (N, C, 1, 1) tensors stays in onnxruntime's blocked layout (channel counts
    # that are multiples of the block), so one reorder of a tiny tensor remains.
    joined = builder.node("Concat", packed, f"{STATS_OUTPUT}_4d", axis=1)
    out.graph.node.append(helper.make_node("Flatten", [joined], [STATS_OUTPUT], axis=1))
    width = StatsLayout.of(layers).width
    out.graph.output.append(
        helper.make_tensor_value_info(STATS_OUTPUT, TensorProto.FLOAT, [None, width])
    )
    return out


class LayerStats(TypedDict):
    """Statistics of one activation layer over one request's samples (see SPEC "Activation
    statistics"): a plain dict, the request's JSON as it is sent. Built in bulk by
    ``summarize_requests``: a dataclass per layer cost ~10 us more per ResNet-20 request to
    build and ~5 us more to turn into JSON (medians of 30 timed calls, 32 requests)."""

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
    saturated_fraction: float | None  # sigmoid and tanh only
    samples: int
    channel_activity: NotRequired[list[float]]  # per channel active share; "channels" only


class LayerActivity(Mapping[str, np.ndarray]):
    """Per-sample per-channel active rates of every layer: one (N, sum C) array, read as
    layer name -> its (N, C) columns (views, made on access)."""

    def __init__(self, array: np.ndarray, columns: Mapping[str, slice]) -> None:
        self.array = array
        self.columns = columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array[:, self.columns[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    def rows(self, part: slice) -> LayerActivity:
        """The same layers for the samples ``part``."""
        return LayerActivity(self.array[part], self.columns)


def per_sample_active(layout: StatsLayout, outputs: Mapping[str, np.ndarray]) -> LayerActivity:
    """Layer name -> (N, C) active rates of the layout's layers."""
    if not layout.width:
        return LayerActivity(np.zeros((0, 0), np.float32), {})
    active = outputs[STATS_OUTPUT][:, layout.index["active"]]  # (N, sum C)
    return LayerActivity(active, layout.columns["active"])


MinimumProbe = Callable[[int, list[ActivationNode]], Mapping[str, float] | None]


def summarize_layers(
    layers: Sequence[ActivationNode],
    layout: StatsLayout,
    outputs: Mapping[str, np.ndarray],
    *,
    channels: bool = False,
    batch_mins: Mapping[str, float] | None = None,
) -> list[LayerStats]:
    """``summarize_requests`` for one request: the whole batch in ``outputs``; the minimum of
    relu/relu6 layers without a zero comes from ``batch_mins`` (the caller measured it)."""
    packed = outputs[STATS_OUTPUT]
    (summary,) = summarize_requests(
        layers, layout, packed, [packed.shape[0]], [channels], lambda _, __: batch_mins
    )
    return summary


def summarize_requests(
    layers: Sequence[ActivationNode],
    layout: StatsLayout,
    packed: np.ndarray,
    sizes: Sequence[int],
    channels: Sequence[bool],
    measure_min: MinimumProbe | None = None,
) -> list[list[LayerStats]]:
    """Per request, the statistics of every layer over that request's own samples: request
    i owns the next ``sizes[i]`` rows of ``packed`` (N, width), the batch's ``stats/packed``
    output, and gets per-channel activity when ``channels[i]``.

    Aggregated in float64, with one numpy call per quantity for the whole batch (a batch of
    32 one-sample ResNet-20 requests: ~100 us per request one request at a time, ~20 now).
    Every (sample, channel) pools the same number of positions within a layer, so plain
    means over (N, C) are means over all elements. The variance is E[y^2] - E[y]^2 from
    float32 per-group moments: its absolute error is about 3e-7 * E[y^2] (float32 pooling),
    a relative std error of ~1.5e-7 * (1 + mean^2 / var), below 1e-5 unless the layer is
    nearly constant. The minimum of relu/relu6 layers is 0 when any element is inactive
    (exact); for the rare request in which such a layer has no inactive element at all,
    ``measure_min(i, layers)`` gives those layers' minima (None or missing: unknown).
    """
    if not layers:
        return [[] for _ in sizes]
    # Over each request's samples for all columns (R, width), then per layer with reduceat
    # over each layer's first column (R, layers).
    col_mean, col_max, col_min = _per_request(packed, sizes)
    index, starts, widths = layout.index, layout.starts["active"], layout.sizes["active"]
    col_active = col_mean[:, index["active"]]  # (R, sum C) per channel active share
    dead_mask = col_max[:, index["max"]] <= 0  # exact: no y > 0 anywhere in the request
    inactive = (1.0 - np.add.reduceat(col_active, starts, axis=1) / widths).tolist()
    means = np.add.reduceat(col_mean[:, index["mean"]], starts, axis=1) / widths
    meansqs = np.add.reduceat(col_mean[:, index["meansq"]], starts, axis=1) / widths
    with np.errstate(invalid="ignore", over="ignore"):
        variances = meansqs - means * means
        stds = np.sqrt(np.maximum(variances, 0.0))
    stds_list = np.where(np.isfinite(variances), stds, np.nan).tolist()
    maxima = np.maximum.reduceat(col_max[:, index["max"]], starts, axis=1).tolist()
    dead_counts = np.add.reduceat(dead_mask, starts, axis=1, dtype=np.int64).tolist()
    zero_seen = np.minimum.reduceat(col_min[:, index["active"]], starts, axis=1) < 1.0
    structural_min = [not layer.needs_min_output for layer in layers]
    structural_layers = [i for i, structural in enumerate(structural_min) if structural]
    # relu/relu6: 0 when the request saw a zero, else unknown (NaN) until measured below
    zero_or_unknown = np.where(zero_seen, 0.0, np.nan)
    graph_minima = _per_layer(np.minimum, col_min, layout, "min")
    minima = np.where(structural_min, zero_or_unknown, graph_minima).tolist()
    saturated = _per_layer(np.add, col_mean, layout, "saturated").tolist()
    means_list = means.tolist()
    dead_channels = _dead_channels(dead_mask, starts)
    static = [(i, layer.name, layer.kind, layer.channels) for i, layer in enumerate(layers)]
    active_columns = layout.columns["active"]
    results = []
    for r, n in enumerate(sizes):
        mins = minima[r]
        unknown = [i for i in structural_layers if mins[i] != mins[i]]  # saw no zero
        if unknown:
            measured = (measure_min(r, [layers[i] for i in unknown]) if measure_min else None) or {}
            for i in unknown:
                mins[i] = measured.get(layers[i].name)
        dead = dead_channels.get(r, {})
        summary: list[LayerStats] = [
            {
                "name": name,
                "kind": kind,
                "channels": channels_,
                "inactive_fraction": inactive_,
                "dead_units": dead_units,
                "dead_channels": dead.get(i, []),
                "mean": mean,
                "std": None if std != std else std,  # NaN: y*y overflowed float32
                "min": minimum,
                "max": maximum,
                "saturated_fraction": None if sat != sat else sat,  # NaN: not sigmoid/tanh
                "samples": n,
            }
            for (i, name, kind, channels_), inactive_, dead_units, mean, std, minimum, maximum, sat
            in zip(
                static, inactive[r], dead_counts[r], means_list[r], stds_list[r], mins,
                maxima[r], saturated[r], strict=True,
            )
        ]  # fmt: skip
        if channels[r]:
            for entry in summary:
                entry["channel_activity"] = col_active[r, active_columns[entry["name"]]].tolist()
        results.append(summary)
    return results


def request_rows(sizes: Sequence[int]) -> list[slice]:
    """The rows of a merged batch that belong to each request, ``sizes[i]`` rows each."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _per_request(packed: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Column means (float64), maxima and minima of each request's rows: (R, width) each.
    One-sample requests (the usual case under load) are their own rows; numpy's reduceat
    over rows is slow (~300 us for 32 groups of a ResNet-20's columns), one call per request
    is not."""
    if len(sizes) == packed.shape[0]:
        return packed.astype(np.float64), packed, packed
    if len(sizes) == 1:
        return (
            packed.sum(axis=0, dtype=np.float64, keepdims=True) / packed.shape[0],
            packed.max(axis=0, keepdims=True),
            packed.min(axis=0, keepdims=True),
        )
    parts = [packed[rows] for rows in request_rows(sizes)]
    return (
        np.stack([p.sum(axis=0, dtype=np.float64) / p.shape[0] for p in parts]),
        np.stack([p.max(axis=0) for p in parts]),
        np.stack([p.min(axis=0) for p in parts]),
    )


def _dead_channels(dead: np.ndarray, starts: np.ndarray) -> dict[int, dict[int, list[int]]]:
    """request -> layer -> that layer's dead channel indices, for the pairs that have any,
    from the (R, sum C) dead mask and each layer's first column."""
    rows, cols = np.nonzero(dead)  # row-major: by request, then column (so by layer)
    if not rows.size:
        return {}
    layer = np.searchsorted(starts, cols, side="right") - 1
    local = (cols - starts[layer]).tolist()
    key = rows * len(starts) + layer  # one run of equal keys per (request, layer)
    cuts = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(local)]
    keys = key.tolist()
    found: dict[int, dict[int, list[int]]] = {}
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        request, layer_index = divmod(keys[a], len(starts))
        found.setdefault(request, {})[layer_index] = local[a:b]
    return found


def _per_layer(ufunc: np.ufunc, columns: np.ndarray, layout: StatsLayout, stat: str) -> np.ndarray:
    """(R, layers): per request and layer, the reduction (``np.minimum``, or the mean for
    ``np.add``) of ``stat``; NaN for layers without it."""
    found = np.full((columns.shape[0], len(layout.columns["active"])), np.nan)
    if stat not in layout.index:
        return found
    values = ufunc.reduceat(columns[:, layout.index[stat]], layout.starts[stat], axis=1)
    if ufunc is np.add:
        values = values / layout.sizes[stat]
    found[:, layout.layer_positions[stat]] = values
    return found
