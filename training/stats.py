"""What each activation layer does on held-out data: sparsity, dead units, gradient norms.

Definitions follow SPEC.md: an element is *active* when y > 0; the *inactive fraction* is the
share of elements that are not; a *dead unit* is a channel with no active element in any
sample and position observed; the *saturated fraction* (sigmoid, tanh) is the share of
outputs whose derivative is below 1% of its peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.metadata import SATURATING_KINDS, LayerProfile
from training.architectures import ACTIVATION_MODULES, activation_kind

# Derivative below 1% of its peak. sigmoid' = s(1 - s), peak 1/4; tanh' = 1 - t^2, peak 1.
SIGMOID_SATURATED = 0.01 * 0.25
TANH_SATURATED = 0.01


def saturated_mask(y: torch.Tensor, kind: str) -> torch.Tensor:
    """Boolean mask of saturated outputs for sigmoid or tanh."""
    if kind == "sigmoid":
        return y * (1 - y) < SIGMOID_SATURATED
    return 1 - y * y < TANH_SATURATED


@dataclass
class LayerStats:
    """Aggregated statistics of one activation layer over the observed samples."""

    name: str
    kind: str
    channels: int
    inactive_fraction: float
    dead_units: int
    channel_activity: list[float]  # per channel: share of active elements
    mean: float
    std: float
    minimum: float
    maximum: float
    saturated_fraction: float | None
    grad_norm: float | None = None

    def to_record(self) -> dict:
        """The per-layer entry of a metrics.jsonl line (no per-channel lists: they are big)."""
        return {
            "kind": self.kind,
            "channels": self.channels,
            "inactive_fraction": self.inactive_fraction,
            "dead_units": self.dead_units,
            "grad_norm": self.grad_norm,
            "saturated_fraction": self.saturated_fraction,
            "mean": self.mean,
            "std": self.std,
        }

    def to_profile(self) -> LayerProfile:
        """The reference profile entry stored in an exported model."""
        return LayerProfile(
            inactive_fraction=self.inactive_fraction,
            channel_activity=self.channel_activity,
            dead_units=self.dead_units,
            saturated_fraction=self.saturated_fraction,
            mean=self.mean,
            std=self.std,
        )


class LayerAccumulator:
    """Per-channel running sums for one layer, fed by a forward hook or by ``update``."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        # (C,) counts, sized by the first batch
        self.active: torch.Tensor | None = None
        self.saturated: torch.Tensor | None = None
        self.count = 0  # elements per channel seen
        self.total = self.total_sq = 0.0
        self.minimum, self.maximum = float("inf"), float("-inf")

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        """Forward hook: add the layer's output."""
        self.update(output)

    def update(self, output: torch.Tensor) -> None:
        """Add one batch of the layer's output (N, C, ...)."""
        y = output.detach().double()  # (N, C, ...) float64: exact counts and sums
        dims = [d for d in range(y.dim()) if d != 1]
        active = (y > 0).sum(dim=dims)  # (C,)
        count = y.numel() // y.shape[1]
        if self.active is None or self.saturated is None:
            self.active, self.saturated = torch.zeros_like(active), torch.zeros_like(active)
        self.active += active
        self.count += count
        if self.kind in SATURATING_KINDS:
            self.saturated += saturated_mask(y, self.kind).sum(dim=dims)
        self.total += y.sum().item()
        self.total_sq += (y * y).sum().item()
        self.minimum = min(self.minimum, y.min().item())
        self.maximum = max(self.maximum, y.max().item())

    def result(self) -> LayerStats:
        if self.active is None or self.saturated is None:
            raise ValueError(f"layer {self.name!r}: no batch observed")
        channels = self.active.numel()
        n = self.count * channels
        activity = (self.active.double() / self.count).tolist()
        mean = self.total / n
        var = max(self.total_sq / n - mean * mean, 0.0)
        saturated = None
        if self.kind in SATURATING_KINDS:
            saturated = self.saturated.sum().item() / n
        return LayerStats(
            name=self.name,
            kind=self.kind,
            channels=channels,
            inactive_fraction=1.0 - self.active.sum().item() / n,
            dead_units=int((self.active == 0).sum().item()),
            channel_activity=activity,
            mean=mean,
            std=var**0.5,
            minimum=self.minimum,
            maximum=self.maximum,
            saturated_fraction=saturated,
        )


def producer_layers(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """For each activation layer, the conv/linear layer that last ran before it.

    Its weights' gradient norm is the layer's "gradient norm": the signal that shrinks
    layer by layer when gradients vanish through saturating activations.
    """
    order: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, mod)))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, *ACTIVATION_MODULES))
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    producers, last = {}, None
    for name, module in order:
        if isinstance(module, ACTIVATION_MODULES):
            if last is not None:
                producers[name] = last
        else:
            last = name
    return producers


def measure_layers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
) -> list[LayerStats]:
    """Statistics of every activation layer over (x, y), plus its producer's gradient norm."""
    was_training = model.training
    model.eval()
    producers = producer_layers(model, x) if len(x) else {}  # before our hooks see a sample
    accumulators = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATION_MODULES):
            acc = LayerAccumulator(name, activation_kind(module))
            accumulators.append(acc)
            hooks.append(module.register_forward_hook(acc))
    model.zero_grad(set_to_none=True)
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            # Sum-reduced loss divided by the total: the gradient of the mean loss over all of x.
            loss = F.cross_entropy(model(xb), yb, reduction="sum") / len(x)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    results = []
    for acc in accumulators:
        stats = acc.result()
        producer = producers.get(acc.name)
        if producer is not None and modules[producer].weight.grad is not None:
            stats.grad_norm = modules[producer].weight.grad.norm().item()
        results.append(stats)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return results
