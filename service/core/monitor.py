"""Live activation monitor of one model: rolling sparsity, dead units and drift.

Fed with the per-sample per-channel active rates (N, C) of every request that ran the
statistics session; keeps the last ``window`` samples of all layers in one ring buffer (numpy,
no per-element Python loops) and summarises them on demand. Thread-safe.

Drift, per layer: the mean over channels of |p_c - q_c|, where p_c is channel c's active rate
over the window and q_c its rate in the reference profile stored at export. |p - q| is the
total-variation distance between the channel's live and reference on/off (Bernoulli)
distributions, so the score is the average per-channel total-variation distance: symmetric,
in [0, 1], read as "channels fire, on average, this much more or less often than in
training", and finite for dead or always-on channels (where KL divergence or PSI blow up).
The model's drift is the largest layer drift; a layer has drifted when its score exceeds
the threshold and its window is full (fewer samples give noisy rates).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from service.metadata import ReferenceProfile
from service.runtime.summaries import LayerActivity

# Default drift threshold. On the test fixtures, two independent 64-sample batches from the
# same distribution differ by 0.006-0.011; inverted images move the score to 0.35-0.64.
DEFAULT_DRIFT_THRESHOLD = 0.1


class _Layer(Protocol):
    """What the monitor reads of a layer (read-only, so frozen dataclasses fit)."""

    @property
    def name(self) -> str: ...

    @property
    def channels(self) -> int: ...


class _Ring:
    """The last ``window`` rows of (N, C) arrays, oldest overwritten first."""

    def __init__(self, window: int, channels: int):
        self.buffer = np.zeros((window, channels), dtype=np.float32)  # (W, C)
        self.position = 0
        self.seen = 0

    def push(self, rows: np.ndarray) -> None:
        window = self.buffer.shape[0]
        n = rows.shape[0]
        if n >= window:
            self.buffer[:] = rows[-window:]
            self.position = 0
        else:
            end = self.position + n
            if end <= window:
                self.buffer[self.position : end] = rows
            else:
                first = window - self.position
                self.buffer[self.position :] = rows[:first]
                self.buffer[: n - first] = rows[first:]
            self.position = end % window
        self.seen += n

    def valid(self) -> np.ndarray:
        """The filled rows (order does not matter to the statistics)."""
        return self.buffer if self.seen >= self.buffer.shape[0] else self.buffer[: self.seen]


class ActivationMonitor:
    """Rolling activity of a model's activation layers over its last ``window`` samples."""

    def __init__(
        self,
        layers: Iterable[_Layer],
        reference: ReferenceProfile | None,
        window: int,
        drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    ):
        if window < 1:
            raise ValueError(f"monitor window must be at least 1 sample, got {window}")
        if not 0.0 < drift_threshold <= 1.0:
            raise ValueError(f"drift threshold must be in (0, 1], got {drift_threshold}")
        self.window = window
        self.drift_threshold = drift_threshold
        self.reference = reference
        self._channels = {layer.name: layer.channels for layer in layers}
        self._reference_rates: dict[str, np.ndarray] = {}
        if reference is not None:
            for name, profile in reference.layers.items():
                if name in self._channels:
                    self._reference_rates[name] = np.asarray(
                        profile.channel_activity, dtype=np.float64
                    )
        # All layers' channels side by side in one ring, as the statistics session packs
        # them: a request adds one block of rows, not one per layer.
        self._columns: dict[str, slice] = {}
        width = 0
        for name, channels in self._channels.items():
            self._columns[name] = slice(width, width + channels)
            width += channels
        self._lock = threading.Lock()
        self._ring = _Ring(window, width)

    @property
    def layer_names(self) -> list[str]:
        """Names of the monitored layers, in model order."""
        return list(self._channels)

    def update(self, per_sample_active: Mapping[str, np.ndarray]) -> None:
        """Add one batch: layer name -> (N, C) active rates, for every monitored layer (other
        layers are ignored; a batch with none of ours adds nothing)."""
        if (
            isinstance(per_sample_active, LayerActivity)
            and per_sample_active.columns == self._columns
        ):
            rows = per_sample_active.array  # already packed in our column order
        else:
            packed = self._pack(per_sample_active)
            if packed is None:
                return
            rows = packed
        with self._lock:
            self._ring.push(rows)

    def _pack(self, per_sample_active: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The (N, sum C) block of a mapping of layer -> (N, C) rates, checked."""
        known = [name for name in self._channels if name in per_sample_active]
        if not known:
            return None
        if len(known) != len(self._channels):
            missing = [name for name in self._channels if name not in per_sample_active]
            raise ValueError(f"active rates missing for layers {missing}")
        blocks = []
        for name in known:
            rows = np.asarray(per_sample_active[name], dtype=np.float32)
            if rows.ndim != 2 or rows.shape[1] != self._channels[name]:
                raise ValueError(
                    f"layer {name!r}: expected (N, {self._channels[name]}) active rates, "
                    f"got shape {rows.shape}"
                )
            blocks.append(rows)
        if len({rows.shape[0] for rows in blocks}) != 1:
            raise ValueError("active rates of one batch must have the same rows in every layer")
        return np.concatenate(blocks, axis=1)

    def reset(self) -> None:
        """Forget every sample seen."""
        with self._lock:
            self._ring = _Ring(self.window, self._ring.buffer.shape[1])

    def _layer_snapshot(self, name: str, ring: _Ring) -> dict:
        rows = ring.valid()[:, self._columns[name]]  # (n, C), n <= window
        full = ring.seen >= self.window
        if rows.shape[0]:
            activity = rows.mean(axis=0, dtype=np.float64)  # (C,)
            inactive: float | None = float(1.0 - activity.mean())
        else:
            activity = np.zeros(self._channels[name])
            inactive = None
        # Dead: no activity in any of the last `window` samples; not claimed on fewer.
        dead = np.flatnonzero(rows.max(axis=0) <= 0) if full else None
        reference = self._reference_rates.get(name)
        drift = None
        if reference is not None and rows.shape[0]:
            drift = float(np.abs(activity - reference).mean())
        ref_inactive = None
        if self.reference is not None and name in self.reference.layers:
            ref_inactive = self.reference.layers[name].inactive_fraction
        return {
            "name": name,
            "channels": self._channels[name],
            "samples_seen": ring.seen,
            "samples": int(rows.shape[0]),
            "window_full": full,
            "inactive_fraction": inactive,
            "channel_activity": activity.tolist(),
            "dead_units": None if dead is None else int(dead.size),
            "dead_channels": None if dead is None else dead.tolist(),
            "drift": drift,
            "drifted": bool(full and drift is not None and drift > self.drift_threshold),
            "reference_inactive_fraction": ref_inactive,
        }

    def snapshot(self) -> dict:
        """Rolling statistics, JSON-ready.

        Keys: ``window`` (size), ``samples`` (samples in the window now), ``samples_seen``
        (since start or reset), ``window_full``, ``drift`` (max over layers, None without a
        reference), ``drift_threshold``, ``drifted``, ``has_reference``, and ``layers``: per
        layer ``name``, ``channels``, ``samples_seen``, ``samples``, ``window_full``,
        ``inactive_fraction``, ``channel_activity`` (C rates), ``dead_units`` and
        ``dead_channels`` (None until the window is full), ``drift``, ``drifted``,
        ``reference_inactive_fraction``.
        """
        with self._lock:
            layers = [self._layer_snapshot(name, self._ring) for name in self._channels]
        drifts = [layer["drift"] for layer in layers if layer["drift"] is not None]
        seen = min((layer["samples_seen"] for layer in layers), default=0)
        return {
            "window": self.window,
            "samples": min(seen, self.window),
            "samples_seen": seen,
            "window_full": seen >= self.window,
            "drift": max(drifts) if drifts else None,
            "drift_threshold": self.drift_threshold,
            "drifted": any(layer["drifted"] for layer in layers),
            "has_reference": bool(self._reference_rates),
            "layers": layers,
        }
