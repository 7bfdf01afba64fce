"""Activation statistics computed inside the ONNX graph, next to the activations.

``instrument_model`` returns a copy of the model with a few reduction nodes after each
activation output Y of the layers ``service.runtime.activations`` found, giving per sample and
per channel values, packed into the one extra graph output ``stats/packed`` of shape
(N, sum of C) with the columns ``StatsLayout`` gives; ``service.runtime.summaries`` aggregates
those small arrays per request in numpy. Nothing here imports torch.

Formulations, per layer, on one view Y3 = Reshape(Y, (N, C, positions)):

- active rate = GlobalAveragePool(HardSigmoid(Y3, alpha=2**127, beta=0)). HardSigmoid is
  max(0, min(1, alpha*y + beta)): 0 for y <= 0, exactly 1 for every y >= 2**-127, so the test
  y > 0 is exact for all normal float32 values and half of the subnormal range.
- max = GlobalMaxPool(Y3); dead channels are taken from it (max <= 0 over the batch), exact
  for every float.
- mean = GlobalAveragePool(Y3), in float32; then the deviations D = Y3 - mean of each (sample,
  channel) group, and their mean and mean square (GlobalAveragePool of D and of D*D). The
  deviations' mean is the float32 mean's rounding error, their mean square the group's
  variance without the cancellation of E[y^2] - E[y]^2 (which read 1.3e-5 for a true 1.1e-7
  on near-constant layers); ``summaries._moments`` combines the groups in float64, so every
  statistic is within 1e-5 relative (1e-7 absolute) of a float64 reference.
- min = -GlobalMaxPool(Neg(Y3)), except for relu and relu6 where Y >= 0: there the minimum is
  exactly 0 as soon as one element is inactive, which the active rates show, so no graph
  output is spent on it (``needs_min_output``). The caller handles the rare batch in which a
  ReLU layer has no zero at all (``LoadedModel`` fetches that layer's raw output).
- saturated = mean of Cast(Less(y * (1 - y), 0.0025)) for sigmoid (derivative below 1% of its
  peak 0.25) and Cast(Less(1 - y * y, 0.01)) for tanh: the same float32 expressions as the test
  oracle, so the comparison is exact.

Rank-2 activations (N, C) (dense layers) are already per sample and channel: their values
are Y itself and Greater(Y, 0), with no spread, reshaped to (N, C, 1) to join the Concat.

Cost (onnxruntime 1.32, 2 threads; ``bench/bench_stats_overhead.py`` for ResNet-20,
``bench/bench_stats_deep.py`` for an EfficientNet-like model, docs/benchmarks.md): onnxruntime's
NCHWc transformer keeps convolution outputs in a blocked layout, and a consumer that is not
layout-aware (Sub, Neg, Clip, ReduceMin, ...) gets a full copy of Y back to NCHW inserted
before it. The one view Y3 takes that copy once per layer, after which every statistic reads
plain memory (before, each such consumer had its own: 4-5 copies per layer). Each layer then
costs that copy and 5-7 elementwise passes; observing a tensor also stops onnxruntime's
fusions around it. Tried and dropped before: ``GlobalLpPool`` or ``ReduceSumSquare`` for the
sum of squares (not layout-aware: a reorder per use), one pooling over ``Concat([Y, Y*Y])``
(the Concat's copy costs more than it saves), ``ORT_ENABLE_EXTENDED`` (no NCHWc at all: the
model itself ~2x slower). What helped: intra-op threads that spin during a run
(``service.runtime.providers.session_options``; the statistics add many small nodes, each
of which woke the second thread through the kernel).
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
