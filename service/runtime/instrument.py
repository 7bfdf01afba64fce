"""Activation statistics computed inside the ONNX graph, next to the activations.

``instrument_model`` returns a copy of the model with a few reduction nodes after each
activation output Y of the layers ``service.runtime.activations`` found, giving per sample and
per channel values, packed into the one extra graph output ``stats/packed`` of shape
(N, sum of C) with the columns ``StatsLayout`` gives; ``service.runtime.summaries`` aggregates
those small arrays per request in numpy. Nothing here imports torch.

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
(``service.runtime.providers.session_options``). With spinning off, every parallelised node woke the
second thread through the kernel, and the statistics add ~115 small nodes: on/off measured
1.33-1.40 at two threads, 1.18 at one. Spinning during the run and stopping when it returns
(``session.force_spinning_stop``): 1.20 at two threads (batch 32; profile: the pooling
nodes ~35%, the indicators and squares ~50%, the packing Concat/reorder the rest).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.runtime.activations import ActivationNode

STATS_PREFIX = "stats/"
STATS_OUTPUT = "stats/packed"  # the one extra graph output: (N, StatsLayout.width)
# Statistics each layer exposes as (N, C) graph outputs; "saturated" only for sigmoid/tanh,
# "min" only where the kind does not make it structural (see needs_min_output).
STAT_NAMES = ("active", "max", "mean", "dmean", "dmeansq", "min", "saturated")

# 2**127: the largest power of two a float32 holds; see the module docstring.
_ACTIVE_SCALE = float(2.0**127)
_SIGMOID_SATURATION = 0.0025  # 1% of sigmoid's peak derivative s(1-s) = 0.25
_TANH_SATURATION = 0.01  # 1% of tanh's peak derivative 1 - y^2 = 1


def layer_stat_names(layer: ActivationNode) -> list[str]:
    """The statistics the instrumented graph computes for ``layer``, in packed order."""
    stats = ["active", "max", "mean", "dmean", "dmeansq"]
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

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        output = self._fresh(output)
        self.graph.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _add_layer_stats(b: _GraphBuilder, layer: ActivationNode) -> dict[str, str]:
    """Add the statistic nodes of one layer; returns stat -> (N, C, 1) tensor."""
    y = layer.tensor
    pre = f"{STATS_PREFIX}{layer.name}/"
    if layer.rank >= 3:
        # One view (N, C, positions) of Y: onnxruntime reorders a blocked (NCHWc) Y back to
        # NCHW once for it, after which every statistic below reads plain memory; without
        # it each non-layout-aware consumer (the centring Sub, ReduceMin) got its own
        # reorder, 4-5 full copies per layer (issue 16; see the module docstring).
        y3 = b.node("Reshape", [y, b.const([0, layer.channels, -1])], pre + "view")
        indicator = b.node("HardSigmoid", [y3], pre + "indicator", alpha=_ACTIVE_SCALE, beta=0.0)
        mean = b.node("GlobalAveragePool", [y3], pre + "mean")  # (N, C, 1) float32
        # Deviations from each (sample, channel)'s own float32 mean: their mean (the mean's
        # rounding error) and mean square (the group's variance, without the cancellation
        # of E[y^2] - E[y]^2); combined in float64 by summaries._moments.
        dev = b.node("Sub", [y3, mean], pre + "dev")
        pooled = {
            "active": b.node("GlobalAveragePool", [indicator], pre + "active"),
            "max": b.node("GlobalMaxPool", [y3], pre + "max"),
            "mean": mean,
            "dmean": b.node("GlobalAveragePool", [dev], pre + "dmean"),
            "dmeansq": b.node(
                "GlobalAveragePool", [b.node("Mul", [dev, dev], pre + "dsq")], pre + "dmeansq"
            ),
        }
        if layer.needs_min_output:
            neg_max = b.node("GlobalMaxPool", [b.node("Neg", [y3], pre + "neg")], pre + "negmax")
            pooled["min"] = b.node("Neg", [neg_max], pre + "min")
        y = y3
    else:
        positive = b.node("Greater", [y, b.const(0.0)], pre + "positive")
        pooled = {
            "active": b.node("Cast", [positive], pre + "active", to=TensorProto.FLOAT),
            "max": y,
            "mean": y,
            "dmean": b.node("Sub", [y, y], pre + "dmean"),  # one value per group: no spread
            "dmeansq": b.node("Sub", [y, y], pre + "dmeansq"),
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
    if layer.rank == 2:
        # (N, C) -> (N, C, 1), as the pooled statistics of the (N, C, positions) views.
        shape = b.const([0, layer.channels, 1])
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
