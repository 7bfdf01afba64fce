"""Activation layers of an ONNX graph: ours from the metadata, a foreign model's from its nodes.

``find_activation_nodes`` lists them in graph order with their kinds and channel counts;
``service.runtime.instrument`` adds the statistic nodes after each one.

A foreign model's activation is measured on the tensor the activation outputs, also where the
exporter spelt it out in several nodes (torch.onnx.export, legacy and dynamo, checked with
torch 2.13):

- SiLU / Swish: ``Mul(x, Sigmoid(x))``, kind "silu" (the Sigmoid alone is only the gate, in
  (0, 1): measured there every unit reads active);
- HardSwish: the op, or ``Mul(x, HardSigmoid(x))`` (opset < 14), kind "hardswish";
- GELU: the op (opset 20), ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` and the tanh approximation
  ``x * 0.5 * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``, the products in either
  order, kind "gelu";
- Mish: the op, or ``Mul(x, Tanh(Softplus(x)))``, kind "mish".

A Sigmoid or HardSigmoid whose output multiplies another tensor is a gate (squeeze-and-
excitation, attention): it scales the feature map rather than being the layer's activation, so
it is left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from service.metadata import ACTIVATION_KINDS, SATURATING_KINDS, ActivationLayer

log = logging.getLogger(__name__)

# ONNX op -> our kind name. Clip is relu6 only with bounds (0, 6); other Clip nodes are "clip".
_OP_TO_KIND = {op: kind for kind, op in ACTIVATION_KINDS.items() if op != "Clip"}
# Foreign activation ops we also observe; their kind is the op name unless listed here.
_EXTRA_OPS = frozenset(
    {"HardSigmoid", "HardSwish", "Selu", "Celu", "Softplus", "Gelu", "ThresholdedRelu", "Mish"}
)
_OP_TO_KIND |= {"HardSwish": "hardswish", "Gelu": "gelu", "Mish": "mish"}
ACTIVATION_OPS = frozenset(ACTIVATION_KINDS.values()) | _EXTRA_OPS
# Ops that gate another tensor when their output feeds a Mul with it (see the module docstring).
_GATE_OPS = frozenset({"Sigmoid", "HardSigmoid"})
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
            return _constant_node_value(node)
    return None


def _constant_node_value(node: onnx.NodeProto) -> float | None:
    """Scalar value of a Constant node, or None."""
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


class _GraphIndex:
    """Producers, consumers and scalar constants of a graph, for the pattern matching."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                self.producer[out] = i
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(i)
        self.outputs = {o.name for o in graph.output}
        self.scalars: dict[str, float] = {}
        for init in graph.initializer:
            if math.prod(init.dims) == 1:
                self.scalars[init.name] = float(numpy_helper.to_array(init).reshape(-1)[0])
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    self.scalars[node.output[0]] = value

    def made_by(self, tensor: str, op: str) -> onnx.NodeProto | None:
        """The node producing ``tensor`` if it is an ``op`` of the default domain."""
        i = self.producer.get(tensor)
        node = None if i is None else self.nodes[i]
        return node if node is not None and node.op_type == op and _default_domain(node) else None

    def only_consumer(self, tensor: str, op: str) -> int | None:
        """Index of the one node reading ``tensor`` if it is an ``op`` and ``tensor`` is not a
        graph output (an intermediate the graph hands out is no private part of a pattern)."""
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in self.outputs:
            return None
        node = self.nodes[readers[0]]
        return readers[0] if node.op_type == op and _default_domain(node) else None

    def split_const(self, node: onnx.NodeProto) -> tuple[str, float] | None:
        """(the other input, the constant) of a binary node with one scalar constant input."""
        if len(node.input) != 2:
            return None
        a, b = node.input
        if b in self.scalars and a not in self.scalars:
            return a, self.scalars[b]
        if a in self.scalars and b not in self.scalars:
            return b, self.scalars[a]
        return None

    def times_x(self, start: str, x: str, scale: float) -> int | None:
        """Index of the Mul that completes ``scale * x * start``, following the chain of Mul
        nodes from ``start`` whose other factors are x, constants, or x times a constant
        (exporters order the product ``x * 0.5 * g`` every way); None if there is none."""
        tensor, have_x, factor = start, False, 1.0
        for _ in range(3):  # x and at most two constants
            i = self.only_consumer(tensor, "Mul")
            if i is None:
                return None
            node = self.nodes[i]
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            scaled = self.made_by(other, "Mul")
            split = self.split_const(scaled) if scaled is not None else None
            if other == x and not have_x:
                have_x = True
            elif other in self.scalars:
                factor *= self.scalars[other]
            elif split is not None and split[0] == x and not have_x:
                have_x, factor = True, factor * split[1]
            else:
                return None
            if have_x and math.isclose(factor, scale, rel_tol=1e-4):
                return i
            tensor = node.output[0]
        return None


def _default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _match_pattern(ix: _GraphIndex, i: int) -> tuple[str, int, list[int]] | None:
    """(kind, index of the node producing the activation output, indices of the activation
    ops inside the pattern) for a composite activation whose first op is node ``i``."""
    node = ix.nodes[i]
    op = node.op_type
    if not _default_domain(node) or not node.input:
        return None
    src, out = node.input[0], node.output[0]
    if op in _GATE_OPS:  # SiLU: x * Sigmoid(x); HardSwish: x * HardSigmoid(x)
        end = ix.times_x(out, src, 1.0)
        kind = "silu" if op == "Sigmoid" else "hardswish"
        return None if end is None else (kind, end, [i])
    if op == "Tanh" and (softplus := ix.made_by(src, "Softplus")) is not None:
        end = ix.times_x(out, softplus.input[0], 1.0)  # Mish: x * tanh(softplus(x))
        return None if end is None else ("mish", end, [i, ix.producer[src]])
    if op == "Erf":
        x = _erf_gelu_input(ix, src)
    elif op == "Tanh":
        x = _tanh_gelu_input(ix, src)
    else:
        return None
    add = ix.only_consumer(out, "Add")
    one = ix.split_const(ix.nodes[add]) if add is not None else None
    if x is None or add is None or one is None or one[1] != 1.0:
        return None
    end = ix.times_x(ix.nodes[add].output[0], x, 0.5)  # GELU: x * 0.5 * (1 + erf or tanh)
    return None if end is None else ("gelu", end, [i])


def _erf_gelu_input(ix: _GraphIndex, u: str) -> str | None:
    """x where u = x / sqrt(2) (Div) or x * (1 / sqrt(2)) (Mul)."""
    div = ix.made_by(u, "Div")
    if div is not None and len(div.input) == 2:
        divisor = ix.scalars.get(div.input[1])
        if divisor is not None and math.isclose(divisor, math.sqrt(2.0), rel_tol=1e-4):
            return str(div.input[0])
    mul = ix.made_by(u, "Mul")
    split = ix.split_const(mul) if mul is not None else None
    if split is not None and math.isclose(split[1], math.sqrt(0.5), rel_tol=1e-4):
        return split[0]
    return None


def _tanh_gelu_input(ix: _GraphIndex, u: str) -> str | None:
    """x where u = sqrt(2 / pi) * (x + 0.044715 * x^3), x^3 as Pow(x, 3) or x * (x * x)."""
    scale = ix.made_by(u, "Mul")
    split = ix.split_const(scale) if scale is not None else None
    if split is None or not math.isclose(split[1], math.sqrt(2 / math.pi), rel_tol=1e-4):
        return None
    add = ix.made_by(split[0], "Add")
    if add is None or len(add.input) != 2:
        return None
    a, b = str(add.input[0]), str(add.input[1])
    for x, term in ((a, b), (b, a)):
        cubic = ix.made_by(term, "Mul")
        coef = ix.split_const(cubic) if cubic is not None else None
        if coef is None or not math.isclose(coef[1], 0.044715, rel_tol=1e-4):
            continue
        if _is_cube(ix, coef[0], x):
            return x
    return None


def _is_cube(ix: _GraphIndex, tensor: str, x: str) -> bool:
    """Whether ``tensor`` is x^3: Pow(x, 3) or Mul(x, Mul(x, x)) in any order."""
    power = ix.made_by(tensor, "Pow")
    if power is not None:
        return power.input[0] == x and ix.scalars.get(power.input[1]) == 3.0
    outer = ix.made_by(tensor, "Mul")
    if outer is None or x not in outer.input:
        return False
    square = outer.input[1] if outer.input[0] == x else outer.input[0]
    inner = ix.made_by(square, "Mul")
    return inner is not None and list(inner.input) == [x, x]


def find_activation_nodes(
    model: onnx.ModelProto | onnx.GraphProto,
    declared: Iterable[ActivationLayer] | None = None,
) -> list[ActivationNode]:
    """Every activation layer of the graph, in graph order.

    With ``declared`` (our metadata's ``activations``) the layers are those, with their names
    and kinds, and each declared tensor must exist in the graph. Without it, every activation
    node (Relu, LeakyRelu, PRelu, Elu, Clip, Sigmoid, Tanh and a few more) and every composite
    activation (SiLU, HardSwish, GELU, Mish spelt out in nodes: see the module docstring)
    whose output is not a graph output and whose channel count shape inference finds becomes
    a layer, named after the node producing its output (or the output tensor when the node
    has no name). Gates (a Sigmoid or HardSigmoid multiplying another tensor) are left out.
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

    ix = _GraphIndex(graph)
    composite: dict[int, str] = {}  # index of the node producing the output -> kind
    inside: set[int] = set()  # activation ops that are parts of a composite activation
    for i in range(len(ix.nodes)):
        match = _match_pattern(ix, i)
        if match is not None:
            kind, end, parts = match
            composite[end] = kind
            inside.update(parts)
    found: list[ActivationNode] = []
    names: set[str] = set()
    for i, node in enumerate(ix.nodes):
        if i in inside or not _default_domain(node):
            continue
        if i in composite:
            kind = composite[i]
        elif node.op_type in ACTIVATION_OPS:
            if node.op_type in _GATE_OPS and _is_gate(ix, node):
                log.debug("%s %s gates another tensor; not observed", node.op_type, node.name)
                continue
            kind = _kind_of(graph, node)
        else:
            continue
        tensor = node.output[0]
        if tensor in ix.outputs:
            continue  # a sigmoid producing the model's output is the head, not a hidden layer
        shape = shapes.get(tensor) or []
        channels = shape[1] if len(shape) >= 2 else None
        if not isinstance(channels, int) or channels <= 0:
            log.warning("activation %s (%s): channel count unknown; not observed", tensor, kind)
            continue
        name = node.name or tensor
        if name in names:
            name = tensor
        names.add(name)
        found.append(
            ActivationNode(
                name=name,
                kind=kind,
                op_type=node.op_type,
                tensor=tensor,
                channels=channels,
                rank=len(shape),
                node=node.name,
            )  # fmt: skip
        )
    return found


def _is_gate(ix: _GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether a Sigmoid or HardSigmoid (not part of a SiLU or HardSwish) feeds a Mul: then it
    multiplies another tensor, as squeeze-and-excitation's gate does."""
    return any(ix.nodes[i].op_type == "Mul" for i in ix.consumers.get(node.output[0], []))
