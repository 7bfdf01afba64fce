"""The metadata contract shared by training (which writes it) and serving (which reads it).

It travels inside the ONNX file as one JSON string under ``metadata_props[METADATA_KEY]``,
so a model file is self-describing and the service needs nothing beside it. This module
imports neither torch nor onnx: the serving side loads it, and training imports it from here.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

METADATA_KEY = "relu_serve.model"
SCHEMA_VERSION = 1

# Activation kinds we train and recognise, and the ONNX op each one becomes on export.
ACTIVATION_KINDS: dict[str, str] = {
    "relu": "Relu",
    "leaky_relu": "LeakyRelu",
    "prelu": "PRelu",
    "elu": "Elu",
    "relu6": "Clip",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}
# Kinds whose outputs saturate: for them the statistics include the saturated fraction.
SATURATING_KINDS = frozenset({"sigmoid", "tanh"})


class Preprocessing(BaseModel):
    """How to turn an image into the model's input tensor.

    Pixels are converted to ``channels`` (1: grayscale, 3: RGB, or BGR by ``channel_order``),
    resized to ``height`` x ``width`` (``resize_mode``: stretched, or the shorter side resized
    to ``resize_size`` then centre-cropped, as torchvision's ``Resize(256)`` +
    ``CenterCrop(224)``), multiplied by ``scale`` (1/255: [0, 1]), inverted if ``invert``
    (``255 * scale - x``), then normalised per channel: ``(x - mean) / std``. The result is
    float32 in ``layout``: NCHW, or NHWC. The fields after ``background`` came with model
    configurations (``service.model_config``); their defaults are what exported models had.
    """

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    invert: bool = False
    resize: Literal["bilinear", "nearest", "bicubic", "box"] = "bilinear"
    # The background of the training images where it is uniform (digits and MNIST: "dark",
    # light ink on black). An uploaded image whose border is the other way round (a dark
    # digit on white paper) is inverted before normalising. None: never inverted.
    background: Literal["dark", "light"] | None = None
    resize_mode: Literal["stretch", "shorter_side"] = "stretch"
    # shorter_side: the length the shorter side is resized to before the centre crop
    # (torchvision's Resize(256)); None: just enough to cover height x width.
    resize_size: int | None = Field(default=None, gt=0)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = Field(default=1.0 / 255.0, gt=0.0)

    @model_validator(mode="after")
    def _check_lengths(self) -> Preprocessing:
        for field in ("mean", "std"):
            if len(getattr(self, field)) != self.channels:
                raise ValueError(f"preprocessing.{field} needs {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocessing.std values must be positive")
        if self.resize_size is not None and self.resize_size < min(self.height, self.width):
            raise ValueError(
                f"preprocessing.resize_size {self.resize_size} is smaller than the crop "
                f"{self.height}x{self.width}"
            )
        return self

    def sample_shape(self) -> tuple[int, int, int]:
        """One image's tensor shape: (C, H, W) or (H, W, C) by ``layout``."""
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)


class ActivationLayer(BaseModel):
    """One activation layer of the network and the graph tensor it produces."""

    name: str  # the module's name in the training code, e.g. "features.0.act"
    # one of ACTIVATION_KINDS; for foreign models also silu, gelu, hardswish, mish (found by
    # service.runtime.activations), clip, or the ONNX op name of another activation op
    kind: str
    channels: int = Field(gt=0)
    tensor: str  # output tensor name in the ONNX graph
    node: str = ""  # ONNX node name, informative


class LayerProfile(BaseModel):
    """Reference statistics of one activation layer, measured on held-out data at export."""

    inactive_fraction: float = Field(ge=0.0, le=1.0)
    channel_activity: list[float]  # per channel: share of elements that are active (y > 0)
    dead_units: int = Field(ge=0)
    saturated_fraction: float | None = None
    mean: float | None = None
    std: float | None = None


class ReferenceProfile(BaseModel):
    """Per-layer activity of the model on held-out data, the baseline for drift."""

    samples: int = Field(gt=0)
    layers: dict[str, LayerProfile]


class ModelMetadata(BaseModel):
    """Everything the service needs to know about a model, stored inside its ONNX file."""

    schema_version: int = SCHEMA_VERSION
    name: str
    architecture: str
    activation: str
    labels: list[str]
    input_name: str
    output_name: str
    preprocessing: Preprocessing
    activations: list[ActivationLayer]
    reference: ReferenceProfile | None = None
    training: dict = Field(default_factory=dict)  # summary: data, epochs, accuracy, ...
    quantized: bool = False

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: list[str]) -> list[str]:
        if len(labels) < 1:
            raise ValueError("labels must not be empty")
        return labels

    @model_validator(mode="after")
    def _check_reference(self) -> ModelMetadata:
        if self.reference is None:
            return self
        by_name = {layer.name: layer for layer in self.activations}
        for name, profile in self.reference.layers.items():
            layer = by_name.get(name)
            if layer is None:
                raise ValueError(f"reference profile names unknown layer {name!r}")
            if len(profile.channel_activity) != layer.channels:
                raise ValueError(
                    f"reference profile of {name!r} has {len(profile.channel_activity)} "
                    f"channels, the layer has {layer.channels}"
                )
        return self

    def to_json(self) -> str:
        """Serialise for ``metadata_props``."""
        return self.model_dump_json()

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata | None:
        """Read from an ONNX file's metadata properties; None when the file has none of ours."""
        raw = props.get(METADATA_KEY)
        if raw is None:
            return None
        return cls.model_validate(json.loads(raw))
