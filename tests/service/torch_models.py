"""Small PyTorch networks exported to ONNX, for tests and benches that need a deep graph.

``efficientnet_like``: MBConv blocks (expand 1x1, depthwise 3x3, squeeze-and-excitation,
project 1x1, residual) with SiLU, 3x224x224 input as EfficientNet-B0 but narrow, so a run
takes milliseconds on two cores. ``resnet_like``: basic residual blocks with ReLU. Both are
written here (no torchvision) and exported with ``torch.onnx.export`` with a dynamic batch
axis. Batch-norm statistics are randomised so activations are not trivially half zero.
Imports torch: only tests and benches use it, never ``service/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OPSET = 17


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a per-channel sigmoid gate from the pooled features."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        s = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))
        return x * s


class MBConv(nn.Module):
    """EfficientNet's inverted residual block with squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, mid, 1), nn.SiLU()]
        layers += [*_conv_bn(mid, mid, 3, stride, groups=mid), nn.SiLU()]
        layers += [SqueezeExcite(mid, max(1, cin // 4)), *_conv_bn(mid, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


# (expansion, output channels, blocks, stride): EfficientNet-B0's stages at about half width
_EFFICIENTNET_STAGES = [(1, 8, 1, 1), (4, 12, 2, 2), (4, 20, 2, 2), (4, 40, 3, 2),
                        (4, 56, 3, 1), (4, 96, 4, 2), (4, 160, 1, 1)]  # fmt: skip


class EfficientNetLike(nn.Module):
    """A narrow EfficientNet-B0: same depth and resolution, fewer channels."""

    def __init__(self, num_classes: int = 10, stem: int = 16, head: int = 320) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, stem, 3, 2), nn.SiLU()]
        cin = stem
        for expand, cout, blocks, stride in _EFFICIENTNET_STAGES:
            for i in range(blocks):
                layers.append(MBConv(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [*_conv_bn(cin, head, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3)
        )
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetLike(nn.Module):
    """A small ResNet with ReLU: stem, three stages of two basic blocks, linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, widths[0], 3), nn.ReLU()]
        cin = widths[0]
        for i, width in enumerate(widths):
            layers += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            cin = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so activations vary by channel."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.2)
    return model.eval()


def export_onnx(model: nn.Module, path: Path, image_size: int) -> Path:
    """Export ``model`` (3 x image_size x image_size input) with a dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, image_size, image_size)
    torch.onnx.export(
        model.eval(), (x,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET,
        dynamo=False,
    )  # fmt: skip
    return path


def export_efficientnet_like(path: Path, image_size: int = 224, seed: int = 0) -> Path:
    """``EfficientNetLike`` with random weights, exported to ``path``."""
    torch.manual_seed(seed)
    return export_onnx(randomize_batch_norm(EfficientNetLike(), seed), path, image_size)


def export_resnet_like(path: Path, image_size: int = 64, seed: int = 0) -> Path:
    """``ResNetLike`` with random weights, exported to ``path``."""
    torch.manual_seed(seed)
    return export_onnx(randomize_batch_norm(ResNetLike(), seed), path, image_size)
