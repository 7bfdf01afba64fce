"""Every registered architecture with every activation: forward shape and a training step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.metadata import ACTIVATION_KINDS
from training.architectures import (
    INITS,
    activation_kind,
    activation_layers,
    create_model,
    list_models,
)

SIZES = {"small_cnn": (1, (8, 8)), "vgg": (3, (32, 32)), "resnet20": (3, (32, 32))}
EXPECTED_LAYERS = {"small_cnn": 5, "vgg": 7, "resnet20": 19}


def test_registry_lists_the_three_architectures():
    assert set(list_models()) == {"small_cnn", "vgg", "resnet20"}


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("activation", list(ACTIVATION_KINDS))
def test_forward_and_training_step(arch, activation):
    torch.manual_seed(0)
    channels, size = SIZES[arch]
    model = create_model(
        arch, activation=activation, in_channels=channels, image_size=size, num_classes=7
    )
    x, y = torch.randn(4, channels, *size), torch.tensor([0, 1, 2, 6])
    logits = model(x)
    assert logits.shape == (4, 7)
    layers = activation_layers(model)
    assert len(layers) == EXPECTED_LAYERS[arch]
    assert {activation_kind(m) for _, m in layers} == {activation}
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(logits, y).backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > len(before) // 2  # gradients reached most parameters


def test_activation_modules_are_distinct_instances():
    model = create_model("small_cnn", activation="prelu", image_size=(8, 8))
    modules = [m for _, m in activation_layers(model)]
    assert len({id(m) for m in modules}) == len(modules)
    assert [m.num_parameters for m in modules] == [32, 32, 64, 64, 128]  # one slope per channel


@pytest.mark.parametrize("init", INITS)
def test_initialisations(init):
    torch.manual_seed(0)
    model = create_model("small_cnn", activation="relu", image_size=(8, 8), init=init)
    conv = model.features[1].conv  # 32 -> 32 channels, 3x3: fan_in 288
    std = conv.weight.std().item()
    expected = {
        "he": (2 / 288) ** 0.5,  # kaiming normal, gain sqrt(2)
        "xavier": (2 / (288 + 288)) ** 0.5,  # glorot: sqrt(2 / (fan_in + fan_out))
        "default": (1 / 288) ** 0.5 / 3**0.5,  # PyTorch: uniform(+-1/sqrt(fan_in))
    }
    assert std == pytest.approx(expected[init], rel=0.1)


def test_batch_norm_switch():
    with_bn = create_model("resnet20", in_channels=3, image_size=(32, 32), batch_norm=True)
    without = create_model("resnet20", in_channels=3, image_size=(32, 32), batch_norm=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())


def test_leaky_relu_slope_is_used():
    model = create_model("small_cnn", activation="leaky_relu", image_size=(8, 8))
    assert all(m.negative_slope == 0.01 for _, m in activation_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "alexnet"}, "unknown architecture 'alexnet'; choose one of resnet20, small_cnn"),
        ({"name": "vgg", "activation": "swish"}, "unknown activation 'swish'; choose one of relu"),
        ({"name": "vgg", "init": "lecun"}, "unknown init 'lecun'; choose one of he, xavier"),
    ],
)
def test_bad_choices_name_the_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        create_model(**kwargs)
