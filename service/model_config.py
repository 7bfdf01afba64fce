"""A model's configuration file beside it, as Triton keeps ``config.pbtxt``: for models that
carry none of our metadata (a classifier exported from PyTorch by its user), or to change
what the metadata says.

``models/<name>/config.json`` applies to every version of the model;
``models/<name>/<version>/config.json``, when present, overrides it for that version, field
by field (its ``preprocessing`` fields over the model's, the other fields whole). The result
overrides the model file's own metadata the same way: a field the configuration sets wins,
the others keep the metadata's values.

Read and checked when a version loads (``read_model_config``, then ``resolve_preprocessing``
once the input shape is known); a bad file fails that version's load with a message naming
the file and the field, and other models keep serving. Docs: docs/models.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.metadata import Preprocessing
from service.settings import BatchingOverride

CONFIG_FILENAME = "config.json"


class ModelConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the field."""


class PreprocessingConfig(BaseModel):
    """``Preprocessing``'s fields, all optional: what is unset comes from the model's metadata,
    else from its input shape (channels, height, width), else the defaults (mean 0, std 1)."""

    model_config = ConfigDict(extra="forbid")

    height: int | None = Field(default=None, gt=0)
    width: int | None = Field(default=None, gt=0)
    channels: Literal[1, 3] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    invert: bool | None = None
    resize: Literal["bilinear", "nearest", "bicubic", "box"] | None = None
    background: Literal["dark", "light"] | None = None
    resize_mode: Literal["stretch", "shorter_side"] | None = None
    resize_size: int | None = Field(default=None, gt=0)
    channel_order: Literal["RGB", "BGR"] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    scale: float | None = Field(default=None, gt=0.0)


class ModelConfig(BaseModel):
    """One ``config.json``. ``labels``: a list, or the path of a text file (one label per line,
    relative to the folder of the config.json naming it); after ``read_model_config`` always
    a list."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | str | None = None
    preprocessing: PreprocessingConfig | None = None
    observe: list[str] | None = None  # activation layers observed: names, kinds or ONNX ops
    batching: BatchingOverride | None = None  # where the settings' model_batching is silent
    providers: list[str] | None = None  # where the settings' model_providers is silent

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a list of labels or the path of a labels file")
        return value

    @field_validator("observe", "providers")
    @classmethod
    def _check_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not v.strip() for v in value)):
            raise ValueError("needs at least one non-empty name")
        return value

    @property
    def label_list(self) -> list[str] | None:
        """The labels once resolved (``read_model_config`` turns a path into a list)."""
        return self.labels if isinstance(self.labels, list) else None


def describe_errors(source: str, exc: ValidationError) -> str:
    """One line per pydantic error: ``source: field.path: message (got value)``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: {where}: {error['msg']}{shown}")
    return "; ".join(lines)


def load_config_file(path: Path) -> ModelConfig:
    """Parse and check one config file; its labels file, if named, read into a list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelConfigError(describe_errors(str(path), exc)) from None
    if isinstance(config.labels, str):
        labels_path = path.parent / config.labels
        try:
            lines = labels_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelConfigError(
                f"{path}: labels: the labels file {labels_path} cannot be read ({exc})"
            ) from None
        labels = [line.strip() for line in lines]
        while labels and not labels[-1]:  # a trailing newline or blank lines at the end
            labels.pop()
        if not labels:
            raise ModelConfigError(f"{path}: labels: the labels file {labels_path} is empty")
        config = config.model_copy(update={"labels": labels})
    return config


def merge_configs(base: ModelConfig | None, override: ModelConfig | None) -> ModelConfig | None:
    """``override``'s fields over ``base``'s; ``preprocessing`` field by field."""
    if base is None or override is None:
        return override or base
    merged: dict[str, Any] = base.model_dump(exclude_unset=True)
    for key, value in override.model_dump(exclude_unset=True).items():
        if key == "preprocessing" and isinstance(merged.get(key), dict) and value is not None:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return ModelConfig.model_validate(merged)


def read_model_config(model_file: Path) -> ModelConfig | None:
    """The configuration of the model file at ``<name>/<version>/model.onnx``: the model
    folder's config.json and the version folder's over it; None when there is neither."""
    version_dir = model_file.parent
    found = [
        load_config_file(folder / CONFIG_FILENAME)
        for folder in (version_dir.parent, version_dir)
        if (folder / CONFIG_FILENAME).is_file()
    ]
    config: ModelConfig | None = None
    for one in found:
        config = merge_configs(config, one)
    return config


def resolve_preprocessing(
    metadata: Preprocessing | None,
    config: PreprocessingConfig | None,
    input_shape: Sequence[int | None],
) -> Preprocessing | None:
    """The metadata's preprocessing with the configuration's fields over it; the fields
    neither sets come from the input shape (channels, height, width) and the defaults
    (mean 0, std 1). Raises ``ModelConfigError`` naming the field."""
    if config is None:
        return metadata
    fields: dict[str, Any] = metadata.model_dump() if metadata else {}
    fields.update(config.model_dump(exclude_unset=True))
    dims = list(input_shape)
    if len(dims) == 4:
        nhwc = fields.get("layout") == "NHWC"
        shape = dict(
            zip(
                ("height", "width", "channels"),
                dims[1:] if nhwc else dims[2:] + dims[1:2],
                strict=True,
            )
        )
        for key, dim in shape.items():
            if key not in fields and isinstance(dim, int) and dim > 0:
                fields[key] = dim
    channels = fields.get("channels")
    if channels in (1, 3):
        fields.setdefault("mean", [0.0] * channels)
        fields.setdefault("std", [1.0] * channels)
    try:
        prep = Preprocessing.model_validate(fields)
    except ValidationError as exc:
        raise ModelConfigError(describe_errors("config.json: preprocessing", exc)) from None
    _check_fits(prep, dims)
    return prep


def _check_fits(prep: Preprocessing, dims: Sequence[int | None]) -> None:
    """The images it makes fit the model's input: rank 4, and the fixed dims agree."""
    if len(dims) != 4:
        raise ModelConfigError(
            f"config.json: preprocessing makes images ({prep.layout}) but the model's input "
            f"has rank {len(dims)}"
        )
    names = (
        ("height", "width", "channels")
        if prep.layout == "NHWC"
        else ("channels", "height", "width")
    )
    for axis, (name, want) in enumerate(zip(names, prep.sample_shape(), strict=True), start=1):
        dim = dims[axis]
        if isinstance(dim, int) and dim > 0 and dim != want:
            raise ModelConfigError(
                f"config.json: preprocessing.{name} is {want} but the model's input "
                f"({prep.layout}) has {dim} at dim {axis}"
            )


def observed_layers(layers: Sequence[Any], observe: Sequence[str] | None) -> list[Any]:
    """The activation layers ``observe`` names (by layer name, kind or ONNX op); all when
    None. Raises ``ModelConfigError`` for a name that matches none, listing the layers."""
    if observe is None:
        return list(layers)
    wanted = set(observe)
    unknown = [w for w in observe if not any(w in (x.name, x.kind, x.op_type) for x in layers)]
    if unknown:
        names = ", ".join(x.name for x in layers) or "none"
        raise ModelConfigError(
            f"config.json: observe: {unknown} match no activation layer (by name, kind or "
            f"op); the model's layers: {names}"
        )
    return [x for x in layers if wanted & {x.name, x.kind, x.op_type}]


def config_batching(config: ModelConfig | None) -> Mapping[str, Any]:
    """The configuration's batching fields that are set."""
    if config is None or config.batching is None:
        return {}
    return config.batching.model_dump(exclude_none=True)
