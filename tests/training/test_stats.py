"""Per-layer statistics on held-out data against the same numbers computed by hand."""

import pytest
import torch
from torch import nn

from training.architectures import activation_layers, create_model
from training.stats import measure_layers, producer_layers


def _raw_outputs(model, x):
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o.detach()))
        for n, m in activation_layers(model)
    ]
    with torch.no_grad():
        model.eval()
        model(x)
    for h in hooks:
        h.remove()
    return outputs


@pytest.mark.parametrize("activation", ["relu", "elu", "sigmoid", "tanh", "relu6"])
def test_statistics_match_numpy_on_raw_activations(activation):
    torch.manual_seed(0)
    model = create_model("small_cnn", activation=activation, image_size=(8, 8))
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    raw = _raw_outputs(model, x)
    stats = {s.name: s for s in measure_layers(model, x, y, batch_size=16)}
    assert list(stats) == [n for n, _ in activation_layers(model)]
    for name, out in raw.items():
        got = stats[name]
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1)  # (C, N*H*W)
        active = (per_channel > 0).double().mean(1)
        assert got.channels == out.shape[1]
        assert got.inactive_fraction == pytest.approx(1 - (out > 0).double().mean().item())
        assert got.channel_activity == pytest.approx(active.tolist())
        assert got.dead_units == int((active == 0).sum())
        assert got.mean == pytest.approx(out.double().mean().item(), rel=1e-6)
        assert got.std == pytest.approx(out.double().std(unbiased=False).item(), rel=1e-6)
        assert got.minimum == pytest.approx(out.min().item())
        assert got.maximum == pytest.approx(out.max().item())
        if activation == "sigmoid":
            expected = (out * (1 - out) < 0.0025).double().mean().item()
            assert got.saturated_fraction == pytest.approx(expected)
        elif activation == "tanh":
            assert got.saturated_fraction == pytest.approx(
                (1 - out**2 < 0.01).double().mean().item()
            )
        else:
            assert got.saturated_fraction is None


def test_dead_channel_is_counted():
    torch.manual_seed(0)
    model = create_model("small_cnn", activation="relu", image_size=(8, 8), batch_norm=False)
    first = model.features[0].conv
    with torch.no_grad():  # channel 3 of the first layer can never be positive
        first.weight[3].zero_()
        first.bias[3] = -1.0
    stats = measure_layers(model, torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    assert stats[0].dead_units == 1
    assert stats[0].channel_activity[3] == 0.0
    assert min(stats[0].channel_activity[:3] + stats[0].channel_activity[4:]) > 0


def test_gradient_norm_is_that_of_the_producing_layer():
    torch.manual_seed(0)
    model = create_model("resnet20", activation="relu", in_channels=3, image_size=(32, 32))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    producers = producer_layers(model, x)
    assert producers["stem.act"] == "stem.conv"
    assert producers["stages.1.0.act1"] == "stages.1.0.conv1"
    assert producers["stages.1.0.act2"] == "stages.1.0.conv2"
    stats = {s.name: s for s in measure_layers(model, x, y)}
    model.eval()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = model.stages[1][0].conv2.weight.grad.norm().item()
    assert stats["stages.1.0.act2"].grad_norm == pytest.approx(expected, rel=1e-5)
    assert model.training is False


def test_measure_restores_training_mode():
    model = create_model("small_cnn", image_size=(8, 8)).train()
    measure_layers(model, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert model.training
