"""One registry of architectures, each taking the activation as a parameter.

``create_model(name, activation=..., in_channels=..., num_classes=..., image_size=...)``
builds any registered architecture; ``list_models()`` names them. Every activation is its
own module instance, so each layer can be observed (hooks in training, graph nodes in ONNX).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.metadata import ACTIVATION_KINDS

INITS = ("he", "xavier", "default")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass
class ActivationSpec:
    """Which activation to use, with its parameter (the negative slope for leaky_relu)."""

    kind: str = "relu"
    negative_slope: float = 0.01  # leaky_relu
    alpha: float = 1.0  # elu

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(
                f"unknown activation {self.kind!r}; choose one of {', '.join(ACTIVATION_KINDS)}"
            )

    def make(self, channels: int) -> nn.Module:
        """A fresh activation module (PReLU learns one slope per channel)."""
        if self.kind == "relu":
            return nn.ReLU()
        if self.kind == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        if self.kind == "prelu":
            return nn.PReLU(channels, init=0.25)
        if self.kind == "elu":
            return nn.ELU(self.alpha)
        if self.kind == "relu6":
            return nn.ReLU6()
        if self.kind == "sigmoid":
            return nn.Sigmoid()
        return nn.Tanh()


ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.ReLU6, nn.Sigmoid, nn.Tanh)


def activation_kind(module: nn.Module) -> str:
    """The ACTIVATION_KINDS name of an activation module."""
    # ReLU6 is a subclass of Hardtanh, not ReLU, so the order here is safe.
    kinds = {
        nn.ReLU: "relu",
        nn.LeakyReLU: "leaky_relu",
        nn.PReLU: "prelu",
        nn.ELU: "elu",
        nn.ReLU6: "relu6",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
    }
    return kinds[type(module)]


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: add an architecture builder to the registry under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    activation: ActivationSpec | str = "relu",
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: tuple[int, int] = (28, 28),
    batch_norm: bool = True,
    init: str = "he",
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture with the given activation and initialisation."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(list_models())}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    spec = ActivationSpec(activation) if isinstance(activation, str) else activation
    model = _REGISTRY[name](
        act=spec,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=tuple(image_size),
        batch_norm=batch_norm,
        **kwargs,
    )
    initialize(model, init, spec)
    return model


def initialize(model: nn.Module, init: str, spec: ActivationSpec) -> None:
    """He or Xavier initialisation of conv and linear weights; 'default' keeps PyTorch's."""
    if init == "default":
        return
    for module in model.modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if init == "he":
            # He et al. 2015 derive the gain for (leaky) rectifiers; leaky_relu with a=0 is ReLU.
            slope = spec.negative_slope if spec.kind == "leaky_relu" else 0.0
            slope = 0.25 if spec.kind == "prelu" else slope
            nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
        else:
            # Glorot & Bengio 2010; PyTorch's recommended gain for tanh is 5/3, 1 otherwise.
            gain = nn.init.calculate_gain("tanh") if spec.kind == "tanh" else 1.0
            nn.init.xavier_uniform_(module.weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _conv_block(c_in: int, c_out: int, act: ActivationSpec, batch_norm: bool) -> nn.Sequential:
    """conv3x3 -> (BN) -> activation; the activation is named ``act``."""
    block = nn.Sequential()
    block.add_module("conv", nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm))
    if batch_norm:
        block.add_module("bn", nn.BatchNorm2d(c_out))
    block.add_module("act", act.make(c_out))
    return block


# ---------------------------------------------------------------- small CNN


@dataclass
class SmallCNNConfig:
    """Two stages of two 3x3 convolutions each, max-pooled, then one hidden dense layer."""

    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    dropout: float = 0.25


class SmallCNN(nn.Module):
    """A small CNN for digit-sized images (8x8 up to 32x32)."""

    def __init__(
        self,
        act: ActivationSpec,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        batch_norm: bool,
        cfg: SmallCNNConfig,
    ) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        self.features = nn.Sequential(
            _conv_block(in_channels, c1, act, batch_norm),
            _conv_block(c1, c1, act, batch_norm),
            nn.MaxPool2d(2),
            _conv_block(c1, c2, act, batch_norm),
            _conv_block(c2, c2, act, batch_norm),
            nn.MaxPool2d(2),
        )
        h, w = image_size[0] // 4, image_size[1] // 4
        if h < 1 or w < 1:
            raise ValueError(f"small_cnn needs images of at least 4x4, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(c2 * h * w, cfg.hidden),
            act.make(cfg.hidden),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))  # (N, num_classes)
        return logits


@register_model
def small_cnn(
    act: ActivationSpec,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    batch_norm: bool,
    **kwargs: Any,
) -> nn.Module:
    """The default small CNN (about 0.1-0.5 M parameters, depending on the image size)."""
    cfg = SmallCNNConfig(**kwargs)
    return SmallCNN(act, in_channels, num_classes, image_size, batch_norm, cfg)


# ---------------------------------------------------------------- VGG-style


@dataclass
class VGGConfig:
    """Convolution widths, "M" for a 2x2 max-pool (Simonyan & Zisserman 2014, scaled down)."""

    layers: list[int | str] = field(
        default_factory=lambda: [32, 32, "M", 64, 64, "M", 128, 128, "M"]
    )
    hidden: int = 256
    dropout: float = 0.5


class VGG(nn.Module):
    """A VGG-style stack of 3x3 convolutions with a two-layer classifier."""

    def __init__(
        self,
        act: ActivationSpec,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        batch_norm: bool,
        cfg: VGGConfig,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in, pools = in_channels, 0
        for item in cfg.layers:
            if item == "M":
                blocks.append(nn.MaxPool2d(2))
                pools += 1
            else:
                blocks.append(_conv_block(c_in, int(item), act, batch_norm))
                c_in = int(item)
        self.features = nn.Sequential(*blocks)
        h, w = image_size[0] >> pools, image_size[1] >> pools
        if h < 1 or w < 1:
            raise ValueError(f"vgg with {pools} pools needs larger images than {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * h * w, cfg.hidden),
            act.make(cfg.hidden),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


@register_model
def vgg(
    act: ActivationSpec,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    batch_norm: bool,
    **kwargs: Any,
) -> nn.Module:
    """VGG-style network; 32x32 inputs by default, three pools."""
    return VGG(act, in_channels, num_classes, image_size, batch_norm, VGGConfig(**kwargs))


# ---------------------------------------------------------------- ResNet-20


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; He et al. 2016."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: ActivationSpec, batch_norm: bool):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else nn.Identity
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = norm(c_out)
        self.act1 = act.make(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm), norm(c_out)
            )
        self.act2 = act.make(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)  # first, so conv2 is the last layer before act2
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.act2(out + identity)
        return result


@dataclass
class ResNetConfig:
    """CIFAR ResNet: 6n+2 layers; n=3 gives ResNet-20 (He et al. 2016, section 4.2)."""

    blocks_per_stage: int = 3
    widths: tuple[int, int, int] = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a stem, three stages, global average pooling."""

    def __init__(
        self,
        act: ActivationSpec,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        batch_norm: bool,
        cfg: ResNetConfig,
    ) -> None:
        super().__init__()
        w1, w2, w3 = cfg.widths
        norm = nn.BatchNorm2d if batch_norm else nn.Identity
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_channels, w1, 3, padding=1, bias=not batch_norm))
        self.stem.add_module("bn", norm(w1))
        self.stem.add_module("act", act.make(w1))
        stages, c_in = [], w1
        for i, width in enumerate((w1, w2, w3)):
            blocks = []
            for j in range(cfg.blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, act, batch_norm))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.stages(self.stem(x)))
        return logits


@register_model
def resnet20(
    act: ActivationSpec,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    batch_norm: bool,
    **kwargs: Any,
) -> nn.Module:
    """ResNet-20 for CIFAR-sized images: 19 activation layers."""
    return CifarResNet(
        act, in_channels, num_classes, image_size, batch_norm, ResNetConfig(**kwargs)
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every activation layer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)]
