"""Issue 16, exact statistics: every statistic within 1e-5 relative (or 1e-7 absolute) of a
float64 numpy reference computed from the raw activation tensors, near-constant layers
included (where E[y^2] - E[y]^2 in float32 was off by 100x), on graphs built here and on the
small EfficientNet- and ResNet-like networks of ``tests.service.torch_models``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from service.runtime.activations import ActivationNode, find_activation_nodes
from service.runtime.instrument import StatsLayout
from service.runtime.summaries import summarize_layers, summarize_requests
from tests.service.conftest import numpy_layer_stats, run_with_activations
from tests.service.runtime.test_instrument import identity_conv_model, run_instrumented

REL, ABS = 1e-5, 1e-7  # the tolerance


def assert_exact(layers: list[ActivationNode], outputs: dict, raw: dict) -> None:
    """mean, std, min, max, inactive and saturated fractions against the float64 oracle."""
    # relu's minimum without a zero in the batch is the caller's to measure (LoadedModel)
    mins = {layer.name: float(raw[layer.tensor].min()) for layer in layers}
    summaries = summarize_layers(layers, StatsLayout.of(layers), outputs, batch_mins=mins)
    for layer, got in zip(layers, summaries, strict=True):
        want = numpy_layer_stats(raw[layer.tensor], layer.kind)
        for stat in ("mean", "std", "min", "max", "inactive_fraction"):
            assert got[stat] == pytest.approx(want[stat], rel=REL, abs=ABS), (layer.name, stat)
        if want["saturated_fraction"] is not None:
            assert got["saturated_fraction"] == pytest.approx(want["saturated_fraction"], abs=ABS)


@pytest.mark.parametrize(
    ("kind", "centre", "spread"),
    [
        ("sigmoid", -12.0, 0.02),  # y ~ 6e-6, std ~ 1e-7: the EfficientNet case
        ("sigmoid", -16.0, 1e-3),  # std ~ 1e-10: the absolute floor
        ("relu", 1000.0, 0.01),  # mean / std = 1e5
        ("tanh", 3.0, 1e-3),
        ("elu", -20.0, 1.0),  # ~ -1 with a spread of 2e-9
    ],
)
def test_near_constant_layers_are_exact(kind: str, centre: float, spread: float) -> None:
    model = identity_conv_model(kind)
    layers = find_activation_nodes(model)
    rng = np.random.default_rng(3)
    x = (centre + spread * rng.standard_normal((5, 16, 4, 4))).astype(np.float32)
    raw = run_with_activations(model, x, ["act"])
    assert_exact(layers, run_instrumented(model, layers, x), raw)


def test_near_constant_layer_is_exact_per_request_in_a_merged_batch() -> None:
    model = identity_conv_model("sigmoid")
    layers = find_activation_nodes(model)
    rng = np.random.default_rng(4)
    x = (-12.0 + 0.02 * rng.standard_normal((6, 16, 4, 4))).astype(np.float32)
    x[3:] += 0.5  # the second request's mean differs from the first's
    packed = run_instrumented(model, layers, x)["stats/packed"]
    raw = run_with_activations(model, x, ["act"])["act"]
    got = summarize_requests(layers, StatsLayout.of(layers), packed, [3, 2, 1], [False] * 3)
    for (summary,), rows in zip(got, (slice(0, 3), slice(3, 5), slice(5, 6)), strict=True):
        want = numpy_layer_stats(raw[rows], "sigmoid")
        assert summary["mean"] == pytest.approx(want["mean"], rel=REL, abs=ABS)
        assert summary["std"] == pytest.approx(want["std"], rel=REL, abs=ABS)


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.service.torch_models import export_efficientnet_like, export_resnet_like

    folder = tmp_path_factory.mktemp("torch_models")
    return {
        # 96x96 instead of 224: the same graph, fewer positions, a faster test
        "efficientnet": export_efficientnet_like(folder / "efficientnet.onnx", image_size=96),
        "resnet": export_resnet_like(folder / "resnet.onnx", image_size=32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet", "resnet"])
def test_deep_torch_models_are_exact(name: str, torch_models: dict[str, Path]) -> None:
    model = onnx.load(str(torch_models[name]))
    layers = find_activation_nodes(model)
    assert len(layers) >= 10
    size = 96 if name == "efficientnet" else 32
    x = np.random.default_rng(5).standard_normal((2, 3, size, size)).astype(np.float32)
    raw = run_with_activations(model, x, [a.tensor for a in layers])
    assert_exact(layers, run_instrumented(model, layers, x), raw)
