"""Activation layers of an ONNX graph: ours from the metadata, a foreign model's from its nodes.

``find_activation_nodes`` lists them in graph order with their kinds and channel counts;
``service.runtime.instrument`` adds the statistic nodes after each one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from service.metadata import ACTIVATION_KINDS, SATURATING_KINDS, ActivationLayer

log = logging.getLogger(__name__)

# ONNX op -> our kind name. Clip is relu6 only with bounds (0, 6); other Clip nodes are "clip".
_OP_TO_KIND = {op: kind for kind, op in ACTIVATION_KINDS.items() if op != "Clip"}
# Foreign activation ops we also observe; their kind is the op name.
_EXTRA_OPS = frozenset(
    {"HardSigmoid", "HardSwish", "Selu", "Celu", "Softplus", "Gelu", "ThresholdedRelu", "Mish"}
)
ACTIVATION_OPS = frozenset(ACTIVATION_KINDS.values()) | _EXTRA_OPS
# Kinds whose output is >= 0 with exact zeros for inactive units: min is structural.
NONNEGATIVE_KINDS = frozenset({"relu", "relu6"})


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
        layers: list[ActivationNode] = []
        for layer in declared:
            node = producers.get(layer.tensor)
            if node is None:
                raise ValueError(
                    f"metadata names activation tensor {layer.tensor!r} (layer {layer.name!r}) "
                    "that no node of the graph produces"
                )
            shape = shapes.get(layer.tensor)
            rank = len(shape) if shape else 4
            in_graph = shape[1] if shape and len(shape) >= 2 else None
            if isinstance(in_graph, int) and in_graph != layer.channels:
                # The packed statistics are laid out by channel count: a wrong count would
                # shift every later layer's columns.
                raise ValueError(
                    f"metadata says layer {layer.name!r} has {layer.channels} channels, "
                    f"the graph's tensor {layer.tensor!r} has {in_graph}"
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
        shape = shapes.get(tensor) or []
        channels = shape[1] if len(shape) >= 2 else None
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
