"""Reference profiles measured beside a model: ``<name>/<version>/reference.json``.

The drift of the live monitor compares live channel activity with a reference profile. Our
training exporter embeds one in the ONNX metadata; for other models ``python -m service
calibrate`` measures one on a folder of images and writes it beside the model file. When the
repository loads a version, a ``reference.json`` beside it provides its reference profile (over
the embedded one, which stays the fallback). The file records the SHA-256 of the model file it
was measured on: a file measured on other bytes is stale, and is ignored with a warning.

The definitions are the exporter's (``training/stats.py``, SPEC "Activation statistics"): a
channel's activity is its share of active (y > 0) elements over every sample and position,
a layer's inactive fraction is 1 minus the mean of its channels' activity, a dead unit is a
channel active in no element, and mean, std and the saturated fraction are over all elements.
They are measured here with the service's own statistics session, the one that feeds the
live monitor, so live and reference rates come from the same instrument.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from service.core.files import write_atomically
from service.metadata import LayerProfile, ReferenceProfile
from service.runtime.loaded_model import RunResult

log = logging.getLogger(__name__)

REFERENCE_FILENAME = "reference.json"


class _Layer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def channels(self) -> int: ...


class ReferenceFileError(ValueError):
    """A ``reference.json`` that cannot be used: unreadable, invalid, or not this model's."""


class ReferenceFile(BaseModel):
    """What ``reference.json`` holds: the profile, and what it was measured on."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    model: str
    version: str
    sha256: str  # of the model file the profile was measured on
    images: str  # the folder of images
    created: str  # ISO 8601, UTC
    reference: ReferenceProfile


def check_profile(profile: ReferenceProfile, layers: Sequence[_Layer]) -> None:
    """ReferenceFileError unless every layer of ``profile`` is one of ``layers`` with as many
    channels."""
    channels = {layer.name: layer.channels for layer in layers}
    for name, layer_profile in profile.layers.items():
        if name not in channels:
            known = ", ".join(channels) or "none"
            raise ReferenceFileError(
                f"the profile names layer {name!r}, which the model lacks (its layers: {known})"
            )
        if len(layer_profile.channel_activity) != channels[name]:
            raise ReferenceFileError(
                f"the profile of layer {name!r} has {len(layer_profile.channel_activity)} "
                f"channels, the model's layer has {channels[name]}"
            )


def read_reference(path: Path, sha256: str, layers: Sequence[_Layer]) -> ReferenceFile | None:
    """The reference file at ``path`` for the model file with ``sha256`` and ``layers``: None
    when there is none, or when it was measured on another model file (logged);
    ReferenceFileError when it is unreadable or does not fit the model's layers."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReferenceFileError(f"cannot read {path}: {exc}") from exc
    try:
        data = ReferenceFile.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ReferenceFileError(f"{path} is not a valid reference file: {exc}") from exc
    if data.sha256 != sha256:
        log.warning(
            "%s was measured on another model file (sha256 %s..., this one %s...); ignored: "
            "run python -m service calibrate again",
            path, data.sha256[:12], sha256[:12],
        )  # fmt: skip
        return None
    try:
        check_profile(data.reference, layers)
    except ReferenceFileError as exc:
        raise ReferenceFileError(f"{path}: {exc}") from exc
    return data


def write_reference(path: Path, data: ReferenceFile) -> None:
    """Write ``data`` to ``path`` atomically (a poller or a loading worker sees the old file
    or the new, never half)."""
    write_atomically(path, (data.model_dump_json(indent=2) + "\n").encode())


def now_iso() -> str:
    """The time now, ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class ProfileAccumulator:
    """The reference profile of a model's layers, added up from runs with statistics
    (``LoadedModel.run(x, "summary")``), batch by batch."""

    def __init__(self, layers: Sequence[_Layer]) -> None:
        self.layers = list(layers)
        self.samples = 0
        # per layer: (C,) sums over samples of each channel's active rate; (C,) whether
        # active in any sample; sums over samples of the batch mean, mean square and
        # saturated fraction (each batch weighted by its samples: every sample has as many
        # elements)
        self._activity = {layer.name: np.zeros(layer.channels) for layer in layers}
        self._any = {layer.name: np.zeros(layer.channels, dtype=bool) for layer in layers}
        self._mean = dict.fromkeys(self._activity, 0.0)
        self._square: dict[str, float | None] = dict.fromkeys(self._activity, 0.0)
        self._saturated: dict[str, float | None] = dict.fromkeys(self._activity, 0.0)

    def add(self, result: RunResult) -> None:
        """Add one run's statistics (its per-sample active rates and per-layer summaries)."""
        if result.per_sample_active is None or result.layer_stats is None:
            raise ValueError("the run has no statistics: run with stats='summary'")
        n = int(result.logits.shape[0])
        for name in self._activity:
            rates = np.asarray(result.per_sample_active[name], dtype=np.float64)  # (N, C)
            self._activity[name] += rates.sum(axis=0)
            self._any[name] |= (rates > 0).any(axis=0)
        for summary in result.layer_stats:
            name = summary["name"]
            if name not in self._mean:
                continue
            self._mean[name] += n * summary["mean"]
            square = self._square[name]
            std = summary["std"]
            self._square[name] = (
                None
                if square is None or std is None
                else square + n * (std * std + summary["mean"] ** 2)
            )
            saturated = self._saturated[name]
            fraction = summary["saturated_fraction"]
            self._saturated[name] = (
                None if saturated is None or fraction is None else saturated + n * fraction
            )
        self.samples += n

    def profile(self) -> ReferenceProfile:
        """The profile of every sample added."""
        if not self.samples:
            raise ValueError("no samples measured")
        n = self.samples
        layers = {}
        for name, sums in self._activity.items():
            activity = sums / n  # (C,)
            mean = self._mean[name] / n
            square = self._square[name]
            saturated = self._saturated[name]
            layers[name] = LayerProfile(
                inactive_fraction=float(np.clip(1.0 - activity.mean(), 0.0, 1.0)),
                channel_activity=activity.tolist(),
                dead_units=int((~self._any[name]).sum()),
                saturated_fraction=None if saturated is None else saturated / n,
                mean=mean,
                std=None if square is None else max(square / n - mean * mean, 0.0) ** 0.5,
            )
        return ReferenceProfile(samples=n, layers=layers)
