"""Activation layers of models exported from PyTorch (issue 16): each activation is found once,
with its kind, on the tensor it outputs (the Mul of a SiLU, not its Sigmoid), gates of
squeeze-and-excitation blocks are not layers, and the service's statistics of the found
layers equal numpy's on the raw tensors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.runtime.activations import find_activation_nodes
from service.runtime.loaded_model import LoadedModel
from tests.service.conftest import numpy_layer_stats, run_with_activations, save_model

nn = torch.nn

CHANNELS = 8
INPUT_SHAPE = (3, 6, 6)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 conv, ReLU, 1x1 conv, gate, times the input."""

    def __init__(self, channels: int, gate: nn.Module) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(channels // 4, channels, 1)
        self.gate = gate

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class TinyNet(nn.Module):
    """A 3x3 conv before each activation, two SE blocks, a ReLU, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        c = CHANNELS
        torch.manual_seed(0)
        self.acts = nn.ModuleList(
            [
                nn.SiLU(),
                nn.GELU(),
                nn.GELU(approximate="tanh"),
                nn.Hardswish(),
                nn.Mish(),
                nn.ReLU6(),
                nn.PReLU(c, init=0.1),
                nn.LeakyReLU(0.05),
                SqueezeExcite(c, nn.Sigmoid()),
                SqueezeExcite(c, nn.Hardsigmoid()),
                nn.ReLU(),
            ]
        )
        self.convs = nn.ModuleList(
            [nn.Conv2d(INPUT_SHAPE[0] if i == 0 else c, c, 3, padding=1) for i in range(11)]
        )
        self.head = nn.Linear(c, 4)

    def forward(self, x):  # (N, 3, H, W) -> (N, 4)
        for conv, act in zip(self.convs, self.acts, strict=True):
            x = act(conv(x))
        return self.head(x.mean(dim=(2, 3)))


# The layers a user expects, in graph order: (module in TinyNet, kind). The SE blocks' ReLUs
# are layers (of their squeezed (N, C/4, 1, 1) tensors); their gates are not.
EXPECTED = [
    ("acts.0", "silu"),
    ("acts.1", "gelu"),
    ("acts.2", "gelu"),
    ("acts.3", "hardswish"),
    ("acts.4", "mish"),
    ("acts.5", "relu6"),
    ("acts.6", "prelu"),
    ("acts.7", "leaky_relu"),
    ("acts.8.act", "relu"),
    ("acts.9.act", "relu"),
    ("acts.10", "relu"),
]

# (exporter, opset) -> op producing each expected layer's tensor; opset 13 predates the
# HardSwish op (HardSigmoid then Mul), dynamo writes the Mish op, and GELU as the Gelu op only
# from opset 20.
EXPORTS = {
    ("legacy", 17): ["Mul", "Mul", "Mul", "HardSwish", "Mul", "Clip", "PRelu", "LeakyRelu"],
    ("legacy", 13): ["Mul", "Mul", "Mul", "Mul", "Mul", "Clip", "PRelu", "LeakyRelu"],
    ("dynamo", 18): ["Mul", "Mul", "Mul", "HardSwish", "Mish", "Clip", "PRelu", "LeakyRelu"],
    ("dynamo", 20): ["Mul", "Gelu", "Gelu", "HardSwish", "Mish", "Clip", "PRelu", "LeakyRelu"],
}
EXPORT_PARAMS = [
    pytest.param(key, id=f"{key[0]}-opset{key[1]}", marks=[pytest.mark.slow] * (key[0] == "dynamo"))
    for key in EXPORTS
]


def export_onnx(net: nn.Module, exporter: str, opset: int) -> onnx.ModelProto:
    """``net`` through torch.onnx.export with a dynamic batch axis."""
    example = (torch.randn(2, *INPUT_SHAPE),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                net, example, dynamo=True, opset_version=opset, input_names=["x"],
                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                verbose=False,
            )  # fmt: skip
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            net, example, buffer, dynamo=False, opset_version=opset, input_names=["x"],
            output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        )  # fmt: skip
        return onnx.load_from_string(buffer.getvalue())


def module_outputs(net: nn.Module, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Each named module's output for input ``x``, from forward hooks."""
    modules = dict(net.named_modules())
    outputs: dict[str, np.ndarray] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().numpy())
        )
        for name in names
    ]
    with torch.no_grad():
        net(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return TinyNet().eval()


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """(5, 3, 6, 6): another batch size than the export's, so the batch axis must be dynamic."""
    return np.random.default_rng(16).standard_normal((5, *INPUT_SHAPE)).astype(np.float32)


@pytest.mark.parametrize("export", EXPORT_PARAMS)
def test_exported_activations_are_found_at_their_outputs(
    net: nn.Module, inputs: np.ndarray, export: tuple[str, int]
) -> None:
    model = export_onnx(net, *export)
    layers = find_activation_nodes(model)

    assert [layer.kind for layer in layers] == [kind for _, kind in EXPECTED]
    assert [layer.op_type for layer in layers[:8]] == EXPORTS[export]
    assert [(layer.channels, layer.rank) for layer in layers] == [(CHANNELS, 4)] * 8 + [
        (CHANNELS // 4, 4)
    ] * 2 + [(CHANNELS, 4)]
    # Each found tensor is the module's output as torch computes it: the activation's output,
    # not its gate or an intermediate of the pattern.
    raw = run_with_activations(model, inputs, [layer.tensor for layer in layers])
    want = module_outputs(net, inputs, [name for name, _ in EXPECTED])
    for layer, (module, _) in zip(layers, EXPECTED, strict=True):
        np.testing.assert_allclose(raw[layer.tensor], want[module], rtol=1e-4, atol=1e-5)
    # No Sigmoid or HardSigmoid output is a layer: the SiLU and HardSwish gates are inside
    # their patterns, the SE gates (in (0, 1): "every unit active") are left out.
    gates = {n.output[0] for n in model.graph.node if n.op_type in ("Sigmoid", "HardSigmoid")}
    assert len(gates) == 3 + (export == ("legacy", 13))
    assert not gates & {layer.tensor for layer in layers}


@pytest.fixture(scope="module")
def exported_path(net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("h16")
    return save_model(export_onnx(net, "legacy", 17), folder / "torchnet" / "1" / "model.onnx")


def test_statistics_of_exported_activations_match_numpy(
    exported_path: Path, inputs: np.ndarray
) -> None:
    model = LoadedModel.load(exported_path, "torchnet", "1")
    result = model.run(inputs, "channels")
    raw = run_with_activations(
        onnx.load(str(exported_path)), inputs, [layer.tensor for layer in model.layers]
    )

    assert [s["kind"] for s in result.layer_stats] == [kind for _, kind in EXPECTED]
    for layer, got in zip(model.layers, result.layer_stats, strict=True):
        want = numpy_layer_stats(raw[layer.tensor], layer.kind)
        assert got["name"] == layer.name
        np.testing.assert_allclose(got["channel_activity"], want["channel_activity"], atol=1e-7)
        assert got["inactive_fraction"] == pytest.approx(want["inactive_fraction"], abs=1e-7)
        assert got["dead_units"] == want["dead_units"]
        assert got["dead_channels"] == want["dead_channels"]
        assert got["min"] == pytest.approx(want["min"], rel=1e-6, abs=1e-7)
        assert got["max"] == pytest.approx(want["max"], rel=1e-6, abs=1e-7)
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-6)
        assert got["std"] == pytest.approx(want["std"], rel=1e-5, abs=1e-6)
        assert got["saturated_fraction"] is None
        np.testing.assert_allclose(
            result.per_sample_active[layer.name], want["per_sample_active"], atol=1e-7
        )
    # The symptom: measured at the Sigmoid, a SiLU layer read 0% inactive.
    silu = result.layer_stats[0]
    assert 0.0 < silu["inactive_fraction"] < 1.0
    assert silu["min"] < 0.0
