"""Live activation monitor of one model version, over every worker process of the service:
rolling sparsity, dead units and drift.

Counts that add. The monitor is fed the per-sample per-channel active rates (N, C) of every run
of the statistics session, all layers' channels side by side, and keeps only counts that add:

- samples;
- per channel, the sum of the samples' active rates, in fixed point (integer units of
  ``1 / ACTIVITY_SCALE``). Integer sums are exact in any order, so the counts of samples split
  among workers add up to exactly those of one process fed the same samples (float sums are
  not associative);
- per channel, the samples in which it was active at all (rate > 0).

From these: channel activity = rate sum / samples; a layer's inactive fraction = 1 - the mean of
its channels' activity; a dead channel = active in no sample of the window; drift (below).

The window is by time: a ring of ``window_s / bucket_s`` buckets of ``bucket_s`` seconds each,
the current one and those before it, so it covers the last ``window_s`` seconds to a bucket's
precision. Each slot of the ring records its absolute bucket number: readers skip a slot whose
bucket has left the window, and the writer empties it when the ring comes round to it again.
Dead units and ``drifted`` are claimed only once the window holds ``min_samples`` samples
(fewer give noisy rates). Beside the ring, totals since start (samples, per channel rate sums
and active samples) that never reset: the Prometheus counters of ``collect_metrics``, which a
fleet of replicas can sum in PromQL.

Stores and the merge. Each worker process writes its own store, so that no memory is written
by two processes (no lock between processes). With ``shared_dir`` (``ServiceSettings.shared_dir``,
which ``python -m service`` gives its workers) a store is a file
``<shared_dir>/monitor/<model>/<version>-<sha256[:12]>-<layout>.<pid>.counts`` (``layout``: a
hash of the layers, channels and buckets), mapped into memory once when the monitor is made, so
an update is numpy work and memory writes, no system call. A snapshot maps every store file of
the same version, file and layout (a glob; other versions' files are never mixed in) and sums
the live buckets of each: the whole service's answer, whichever worker serves it, and it keeps
the samples of a worker that died until their buckets age out. Without ``shared_dir`` the same
arrays live in the process's memory.

Torn reads: a store's header holds a sequence number that its writer makes odd before it changes
the store and even again after (a seqlock); a reader copies the counts and tries again while the
number was odd or has changed. A number that stays odd belongs to a writer that died mid-batch:
after ``_STUCK_S`` the reader takes the store as it is. Stores in other processes are seen in
the order they were written on x86-64 (total store order); the seqlock relies on that.

Reset: ``<shared_dir>/monitor/<model>/generation`` holds the model's generation number, mapped
once (checking it is a memory read). ``reset`` increments it; each store records the
generation it has acknowledged, and one that acknowledged an older generation counts as an empty
window: for readers at once, and for its writer, which empties its window on its next update.
So a reset from any worker empties the window of all. Totals since start are not reset.

Drift, per layer: the mean over channels of |p_c - q_c|, where p_c is channel c's active rate
over the window and q_c its rate in the reference profile stored at export. |p - q| is the
total-variation distance between the channel's live and reference on/off (Bernoulli)
distributions, so the score is the average per-channel total-variation distance: symmetric,
in [0, 1], read as "channels fire, on average, this much more or less often than in
training", and finite for dead or always-on channels (where KL divergence or PSI blow up).
The model's drift is the largest layer drift; a layer has drifted when its score exceeds
the threshold and the window holds ``min_samples`` samples.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service.metadata import ReferenceProfile
from service.runtime.summaries import LayerActivity

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# Default drift threshold. On the test fixtures, two independent 64-sample batches from the
# same distribution differ by 0.006-0.011; inverted images move the score to 0.35-0.64.
DEFAULT_DRIFT_THRESHOLD = 0.1
# Fixed-point unit of an active rate: a float32 rate in [0, 1] carries 24 bits, so rounding it
# down to 2**-24 loses less than 6e-8 (nothing for rates k / 2**j). An int64 sum holds 5e11
# samples at rate 1.
ACTIVITY_SCALE = 2**24
_CHUNK_ROWS = 127  # rows per integer reduction in count_batch
# A sequence number that stays odd this long belongs to a writer that died mid-batch.
_STUCK_S = 0.1
_EMPTY_BUCKET = np.iinfo(np.int64).min  # a slot never written
# Store file: int64 words. Header, then the ring's bucket numbers and samples (B each), the
# totals' active samples and rate sums (W each), the ring's active samples and rate sums (B, W).
_MAGIC = int.from_bytes(b"relumon1", "little")
_FORMAT = 1
_H_MAGIC, _H_FORMAT, _H_BUCKETS, _H_WIDTH, _H_SEQ, _H_GENERATION, _H_SEEN, _H_TOTAL = range(8)
_HEADER_WORDS = 8


class _Layer(Protocol):
    """What the monitor reads of a layer (read-only, so frozen dataclasses fit)."""

    @property
    def name(self) -> str: ...

    @property
    def channels(self) -> int: ...


class _Model(Protocol):
    """What a monitor factory reads of a model version (``LoadedModel`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def layers(self) -> list[Any]: ...

    @property
    def reference(self) -> ReferenceProfile | None: ...


@dataclass
class _Counts:
    """What one store holds, copied: its window (from the oldest live bucket on) and totals."""

    generation: int  # the reset generation the store has acknowledged
    seen: int  # samples since that reset
    samples: int  # samples in the window
    active: np.ndarray  # (W,) int64: samples in the window in which each channel was active
    activity: np.ndarray  # (W,) int64: rate sums in the window, in 1/ACTIVITY_SCALE
    total: int  # samples since start
    total_active: np.ndarray  # (W,) int64
    total_activity: np.ndarray  # (W,) int64


class _Store:
    """One worker's counts over one int64 buffer (a memory-mapped file or plain memory):
    header, totals since start and the ring of buckets. Only its own process writes it."""

    def __init__(self, data: np.ndarray, buckets: int, width: int) -> None:
        data = np.asarray(data)  # a plain view of a memmap: cheaper to index, same memory
        self.data = data
        self.header = data[:_HEADER_WORDS]
        at = _HEADER_WORDS
        self.slot_bucket = data[at : at + buckets]  # (B,) absolute bucket number of each slot
        self.slot_samples = data[at + buckets : at + 2 * buckets]  # (B,)
        at += 2 * buckets
        self.total_active = data[at : at + width]  # (W,)
        self.total_activity = data[at + width : at + 2 * width]  # (W,)
        at += 2 * width
        self.active = data[at : at + buckets * width].reshape(buckets, width)  # (B, W)
        at += buckets * width
        self.activity = data[at : at + buckets * width].reshape(buckets, width)  # (B, W)
        self.lock = threading.Lock()  # the writer's threads; readers take none
        self._stuck_seq = -1  # an odd sequence number seen to stay odd (a dead writer)

    @staticmethod
    def words(buckets: int, width: int) -> int:
        """Length of a store's buffer in int64 words."""
        return _HEADER_WORDS + 2 * buckets + 2 * width + 2 * buckets * width

    @staticmethod
    def blank(buckets: int, width: int) -> np.ndarray:
        """A new store's buffer: header filled in, every count zero, every slot empty."""
        data = np.zeros(_Store.words(buckets, width), dtype=np.int64)
        data[_H_MAGIC], data[_H_FORMAT] = _MAGIC, _FORMAT
        data[_H_BUCKETS], data[_H_WIDTH] = buckets, width
        data[_HEADER_WORDS : _HEADER_WORDS + buckets] = _EMPTY_BUCKET
        return data

    def fits(self, buckets: int, width: int) -> bool:
        """Whether the header is a store's of this shape."""
        header = self.header
        return bool(
            header[_H_MAGIC] == _MAGIC
            and header[_H_FORMAT] == _FORMAT
            and header[_H_BUCKETS] == buckets
            and header[_H_WIDTH] == width
        )

    def add(
        self, bucket: int, generation: int, samples: int, active: np.ndarray, activity: np.ndarray
    ) -> None:
        """Add one batch's counts to bucket ``bucket`` and to the totals, first emptying the
        window if a reset (``generation``) happened since the last update."""
        slot = bucket % self.slot_bucket.shape[0]
        header = self.header
        with self.lock:
            header[_H_SEQ] += 1  # odd: readers wait
            try:
                if header[_H_GENERATION] != generation:
                    self._empty_window(generation)
                if self.slot_bucket[slot] != bucket:  # the ring came round: a new bucket
                    self.slot_samples[slot] = 0
                    self.active[slot] = 0
                    self.activity[slot] = 0
                    self.slot_bucket[slot] = bucket
                self.slot_samples[slot] += samples
                self.active[slot] += active
                self.activity[slot] += activity
                header[_H_SEEN] += samples
                header[_H_TOTAL] += samples
                self.total_active += active
                self.total_activity += activity
            finally:
                header[_H_SEQ] += 1  # even: consistent again

    def acknowledge(self, generation: int) -> None:
        """Empty the window for reset ``generation`` (totals stay)."""
        with self.lock:
            self.header[_H_SEQ] += 1
            try:
                self._empty_window(generation)
            finally:
                self.header[_H_SEQ] += 1

    def _empty_window(self, generation: int) -> None:
        self.slot_bucket[:] = _EMPTY_BUCKET
        self.header[_H_SEEN] = 0
        self.header[_H_GENERATION] = generation

    def read(self, oldest: int) -> _Counts:
        """A consistent copy of the counts, the window being buckets ``oldest`` and after."""
        header = self.header
        odd_since = 0.0
        while True:
            seq = int(header[_H_SEQ])
            if seq % 2 and seq != self._stuck_seq:  # a batch is being written
                now = time.monotonic()
                odd_since = odd_since or now
                if now - odd_since < _STUCK_S:
                    time.sleep(0)  # let the writer finish (releases the GIL)
                    continue
                log.warning("monitor store %d left mid-batch by its writer; read as is", seq)
                self._stuck_seq = seq
            counts = self._copy(oldest)
            if int(header[_H_SEQ]) == seq:
                return counts
            odd_since = 0.0

    def _copy(self, oldest: int) -> _Counts:
        header = self.header
        live = self.slot_bucket >= oldest  # (B,) slots whose bucket is in the window
        return _Counts(
            generation=int(header[_H_GENERATION]),
            seen=int(header[_H_SEEN]),
            samples=int(self.slot_samples[live].sum()),
            active=self.active[live].sum(axis=0),
            activity=self.activity[live].sum(axis=0),
            total=int(header[_H_TOTAL]),
            total_active=self.total_active.copy(),
            total_activity=self.total_activity.copy(),
        )


class _Generation:
    """The model's reset generation: shared through a mapped file, or in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is None:
            self.value: np.ndarray = np.zeros(1, dtype=np.int64)
        else:
            _create_file(path, np.zeros(1, dtype=np.int64))
            self.value = np.memmap(path, dtype=np.int64, mode="r+", shape=(1,))

    def read(self) -> int:
        """The current generation (a memory read)."""
        return int(self.value[0])

    def increment(self) -> int:
        """Start a new generation; returns it. Workers increment under a file lock."""
        with self._lock:
            if self.path is None:
                self.value[0] += 1
                return int(self.value[0])
            with self.path.open("rb") as file:
                fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
                self.value[0] += 1
                return int(self.value[0])


def _create_file(path: Path, data: np.ndarray) -> None:
    """Write ``data`` to ``path`` unless it exists, atomically: other processes see the whole
    file or none (written aside, then hard-linked, which never replaces a file)."""
    if path.exists():
        return
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    data.tofile(aside)
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # another process made it first
    finally:
        aside.unlink()


# Stores written by this process, by file: two monitors of the same version in one process
# (re-created on a reload) share one store and its lock, so it has one writer.
_WRITTEN_STORES: weakref.WeakValueDictionary[Path, _Store] = weakref.WeakValueDictionary()
_WRITTEN_LOCK = threading.Lock()


def _open_written_store(path: Path, buckets: int, width: int) -> _Store:
    """This process's store file ``path``, mapped once, created if missing. An existing file
    (this process's own, or a dead process's with the same id) is taken over and added to."""
    with _WRITTEN_LOCK:
        store = _WRITTEN_STORES.get(path)
        if store is not None:
            return store
        _create_file(path, _Store.blank(buckets, width))
        data = np.memmap(path, dtype=np.int64, mode="r+")
        store = _Store(data, buckets, width)
        if data.shape[0] != _Store.words(buckets, width) or not store.fits(buckets, width):
            raise RuntimeError(f"monitor store {path} is not a store of this layout")
        if store.header[_H_SEQ] % 2:  # its previous writer died mid-batch
            store.header[_H_SEQ] += 1
        _WRITTEN_STORES[path] = store
        return store


def count_batch(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of (N, W) active rates in [0, 1]: the samples in which it was active (rate >
    0) and the sum of its rates in units of ``1 / ACTIVITY_SCALE`` (each rounded down), int64.

    Native integer reductions over chunks of rows, ~2x faster than one float64 sum with a cast
    (bench: 64 x 4096 rates): a chunk of 127 rows sums in int32 (127 * 2**24 < 2**31) and its
    active flags in uint8. One row (a request of one sample, the common case) takes two
    operations instead (~3x faster there)."""
    if rows.shape[0] == 1:
        row = rows[0]
        return (row > 0).astype(np.int64), (row * np.float32(ACTIVITY_SCALE)).astype(np.int64)
    active, activity = 0, 0
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        part = rows[start : start + _CHUNK_ROWS]  # (n, W), n <= 127
        units = (part * np.float32(ACTIVITY_SCALE)).astype(np.int32)  # exact scaling, floor
        activity = activity + np.add.reduce(units, axis=0, dtype=np.int32).astype(np.int64)
        active = active + np.add.reduce((part > 0).view(np.uint8), axis=0, dtype=np.uint8)
    return np.asarray(active, dtype=np.int64), np.asarray(activity, dtype=np.int64)


class ActivationMonitor:
    """Rolling activity of a model version's activation layers over the last ``window_s``
    seconds, merged over the worker processes that share ``shared_dir``."""

    def __init__(
        self,
        layers: Iterable[_Layer],
        reference: ReferenceProfile | None,
        *,
        min_samples: int = 512,
        window_s: float = 300.0,
        bucket_s: float = 10.0,
        drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
        shared_dir: Path | None = None,
        model: str = "model",
        version: str = "1",
        sha256: str = "",
        worker: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if min_samples < 1:
            raise ValueError(f"monitor min_samples must be at least 1 sample, got {min_samples}")
        if not 0.0 < drift_threshold <= 1.0:
            raise ValueError(f"drift threshold must be in (0, 1], got {drift_threshold}")
        self.buckets = check_window(window_s, bucket_s)
        self.min_samples = min_samples
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.drift_threshold = drift_threshold
        self.reference = reference
        self.model = model
        self.version = version
        self._clock = clock
        self._channels = {layer.name: layer.channels for layer in layers}
        self._reference_rates: dict[str, np.ndarray] = {}
        if reference is not None:
            for name, profile in reference.layers.items():
                if name in self._channels:
                    self._reference_rates[name] = np.asarray(
                        profile.channel_activity, dtype=np.float64
                    )
        # All layers' channels side by side, as the statistics session packs them: a batch
        # adds one block of rows, not one per layer.
        self._columns: dict[str, slice] = {}
        width = 0
        for name, channels in self._channels.items():
            self._columns[name] = slice(width, width + channels)
            width += channels
        self._width = width
        self._readers: dict[Path, _Store] = {}  # every store file of this version, mapped once
        if shared_dir is None:
            self._folder: Path | None = None
            self._generation = _Generation(None)
            self._store = _Store(_Store.blank(self.buckets, width), self.buckets, width)
        else:
            self._folder = Path(shared_dir) / "monitor" / model
            self._folder.mkdir(parents=True, exist_ok=True)
            self._generation = _Generation(self._folder / "generation")
            layout = json.dumps([list(self._channels.items()), self.buckets, bucket_s, _FORMAT])
            digest = hashlib.sha256(layout.encode()).hexdigest()[:8]
            self._prefix = f"{version}-{sha256[:12]}-{digest}"
            path = self._folder / f"{self._prefix}.{worker or os.getpid()}.counts"
            self._store = _open_written_store(path, self.buckets, width)
            self._readers[path] = self._store

    @property
    def layer_names(self) -> list[str]:
        """Names of the monitored layers, in model order."""
        return list(self._channels)

    def update(self, per_sample_active: Mapping[str, np.ndarray]) -> None:
        """Add one batch: layer name -> (N, C) active rates in [0, 1], for every monitored layer
        (other layers are ignored; a batch with none of ours adds nothing). Samples with a
        rate that is not finite are not counted."""
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
        if not np.isfinite(rows).all():
            # NaN or infinity inside the model (an overflow its output may not show: a max
            # pooling drops NaN); cast to an integer count it is undefined (x86-64: -2**63),
            # and would stay in the totals for good. Those samples are left out.
            rows = rows[np.isfinite(rows).all(axis=1)]
        if not rows.shape[0]:
            return
        active, activity = count_batch(rows)
        bucket = math.floor(self._clock() / self.bucket_s)
        self._store.add(bucket, self._generation.read(), int(rows.shape[0]), active, activity)

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
        """Empty the window of every worker (totals since start stay)."""
        self._store.acknowledge(self._generation.increment())

    def _stores(self) -> list[_Store]:
        """Every worker's store of this version: this process's, and those in ``shared_dir``."""
        if self._folder is None:
            return [self._store]
        for path in self._folder.glob(f"{self._prefix}.*.counts"):
            if path not in self._readers:
                data = np.memmap(path, dtype=np.int64, mode="r")
                store = _Store(data, self.buckets, self._width)
                if data.shape[0] == _Store.words(self.buckets, self._width) and store.fits(
                    self.buckets, self._width
                ):
                    self._readers[path] = store
                else:
                    log.warning("monitor: %s is not a store of this layout; skipped", path)
        return list(self._readers.values())

    def _merge(self) -> _Merged:
        """The sum of every worker's counts: windows of the current generation, all totals."""
        oldest = math.floor(self._clock() / self.bucket_s) - self.buckets + 1
        generation = self._generation.read()
        merged = _Merged.empty(self._width)
        for store in self._stores():
            counts = store.read(oldest)
            merged.workers += 1
            merged.total += counts.total
            merged.total_active += counts.total_active
            merged.total_activity += counts.total_activity
            if counts.generation >= generation:  # else reset since its last update: empty
                merged.samples += counts.samples
                merged.seen += counts.seen
                merged.active += counts.active
                merged.activity += counts.activity
        return merged

    def _layer_snapshot(self, name: str, merged: _Merged) -> dict[str, Any]:
        columns = self._columns[name]
        samples = merged.samples
        full = samples >= self.min_samples
        if samples:
            activity = merged.activity[columns] / (float(ACTIVITY_SCALE) * samples)  # (C,)
            inactive: float | None = float(1.0 - activity.mean())
        else:
            activity = np.zeros(self._channels[name])
            inactive = None
        # Dead: active in no sample of the window; not claimed on fewer than min_samples.
        dead = np.flatnonzero(merged.active[columns] == 0) if full else None
        reference = self._reference_rates.get(name)
        drift = None
        if reference is not None and samples:
            drift = float(np.abs(activity - reference).mean())
        ref_inactive = None
        if self.reference is not None and name in self.reference.layers:
            ref_inactive = self.reference.layers[name].inactive_fraction
        return {
            "name": name,
            "channels": self._channels[name],
            "samples_seen": merged.seen,
            "samples": samples,
            "window_full": full,
            "inactive_fraction": inactive,
            "channel_activity": activity.tolist(),
            "dead_units": None if dead is None else int(dead.size),
            "dead_channels": None if dead is None else dead.tolist(),
            "drift": drift,
            "drifted": bool(full and drift is not None and drift > self.drift_threshold),
            "reference_inactive_fraction": ref_inactive,
        }

    def snapshot(self) -> dict[str, Any]:
        """Rolling statistics of the whole service (every worker), JSON-ready.

        Keys: ``window_s`` and ``bucket_s`` (the window: its last ``window_s`` seconds, to a
        bucket), ``min_samples`` (needed for dead units and drift verdicts), ``samples`` (in the
        window now), ``samples_seen`` (since start or reset), ``window_full`` (``samples >=
        min_samples``), ``workers`` (stores merged: one per worker process that has loaded this
        version, living or not), ``drift`` (max over layers, None without a reference),
        ``drift_threshold``, ``drifted``, ``has_reference``, ``drift_unavailable`` (None with a
        reference, else why drift is not measured and how to measure it), and ``layers``: per
        layer ``name``,
        ``channels``, ``samples_seen``, ``samples``, ``window_full``, ``inactive_fraction``,
        ``channel_activity`` (C rates), ``dead_units`` and ``dead_channels`` (None until the
        window is full), ``drift``, ``drifted``, ``reference_inactive_fraction``.
        """
        return self._summarise(self._merge())

    def _summarise(self, merged: _Merged) -> dict[str, Any]:
        layers = [self._layer_snapshot(name, merged) for name in self._channels]
        drifts = [layer["drift"] for layer in layers if layer["drift"] is not None]
        return {
            "window_s": self.window_s,
            "bucket_s": self.bucket_s,
            "min_samples": self.min_samples,
            "samples": merged.samples,
            "samples_seen": merged.seen,
            "window_full": merged.samples >= self.min_samples,
            "workers": merged.workers,
            "drift": max(drifts) if drifts else None,
            "drift_threshold": self.drift_threshold,
            "drifted": any(layer["drifted"] for layer in layers),
            "has_reference": self.has_reference,
            "drift_unavailable": None if self.has_reference else self.drift_unavailable(),
            "layers": layers,
        }

    @property
    def has_reference(self) -> bool:
        """Whether drift is measured: a reference profile covers at least one layer."""
        return bool(self._reference_rates)

    def drift_unavailable(self) -> str:
        """Why drift is not measured, said plainly, with the command that measures it."""
        return (
            f"no reference profile: model {self.model!r} version {self.version} carries none, "
            f"so drift is not measured; measure one on typical images with `python -m service "
            f"calibrate {self.model} --version {self.version} --images DIR`"
        )


@dataclass
class _Merged:
    """Every worker's counts added up."""

    workers: int
    samples: int
    seen: int
    active: np.ndarray  # (W,)
    activity: np.ndarray  # (W,)
    total: int
    total_active: np.ndarray  # (W,)
    total_activity: np.ndarray  # (W,)

    @classmethod
    def empty(cls, width: int) -> _Merged:
        """Nothing counted yet."""
        zeros = [np.zeros(width, dtype=np.int64) for _ in range(4)]
        return cls(0, 0, 0, zeros[0], zeros[1], 0, zeros[2], zeros[3])


def check_window(window_s: float, bucket_s: float) -> int:
    """The number of buckets of ``bucket_s`` seconds in ``window_s``; ValueError unless the
    window is a whole number (at least 1) of buckets."""
    if not (bucket_s > 0 and window_s > 0):
        raise ValueError(f"window ({window_s} s) and bucket ({bucket_s} s) must be positive")
    buckets = round(window_s / bucket_s)
    if buckets < 1 or not math.isclose(buckets * bucket_s, window_s, rel_tol=1e-9):
        raise ValueError(
            f"the monitor window ({window_s} s) must be a whole number of buckets of "
            f"{bucket_s} s, e.g. {max(1, buckets) * bucket_s:g} s"
        )
    return buckets


def monitor_for(model: _Model, **options: Any) -> ActivationMonitor:
    """The monitor of one model version: its layers, reference profile and identity (name,
    version, file hash), with ``options`` for the window and the shared folder."""
    return ActivationMonitor(
        model.layers,
        model.reference,
        model=model.name,
        version=model.version,
        sha256=model.sha256,
        **options,
    )


def monitor_factory(settings: ServiceSettings) -> Callable[[_Model], ActivationMonitor]:
    """``monitor_for`` with the window, threshold and shared folder the settings give: one
    store per worker process in ``shared_dir``, or in memory without it."""
    return partial(
        monitor_for,
        min_samples=settings.monitor_min_samples,
        window_s=settings.monitor_window_s,
        bucket_s=settings.monitor_bucket_s,
        drift_threshold=settings.drift_threshold,
        shared_dir=settings.shared_dir,
    )


def _add_known(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    """A sample for a value the monitor knows; none for an unknown one (a window without
    samples, dead units before it is full, drift without a reference): an absent series
    says "not measured" where a NaN would be averaged, summed and alerted on."""
    if value is not None:
        family.add_metric(labels, float(value))


def collect_metrics(
    monitors: Iterable[ActivationMonitor], namespace: str = "relu_serve"
) -> list[Metric]:
    """Prometheus families of ``monitors``, from their merged view (every worker), at scrape
    time: rolling gauges per model and layer, and counters of the totals since start per model
    and version (per channel too) that a fleet of replicas can sum in PromQL."""
    ns = namespace
    inactive = GaugeMetricFamily(
        f"{ns}_activation_inactive_fraction",
        "Rolling share of inactive activations over the monitor window (no sample while it "
        "is empty).",
        labels=("model", "layer"),
    )
    dead = GaugeMetricFamily(
        f"{ns}_activation_dead_units",
        "Channels active in no sample of the monitor window (no sample until it holds "
        "monitor_min_samples samples).",
        labels=("model", "layer"),
    )
    drift = GaugeMetricFamily(
        f"{ns}_activation_drift_score",
        "Distance of live per-channel activity from the reference profile (no sample for a "
        "model without one, see monitor_has_reference, nor while the window is empty).",
        labels=("model", "layer"),
    )
    has_reference = GaugeMetricFamily(
        f"{ns}_monitor_has_reference",
        "1 when the model's monitored version has a reference profile, so drift is measured; "
        "0 when not (python -m service calibrate measures one).",
        labels=("model",),
    )
    drifted = GaugeMetricFamily(
        f"{ns}_activation_drifted",
        "1 when the layer's drift exceeds drift_threshold over a window of "
        "monitor_min_samples samples or more.",
        labels=("model", "layer"),
    )
    window = GaugeMetricFamily(
        f"{ns}_monitor_window_samples",
        "Samples in the model's monitor window now (all workers).",
        labels=("model",),
    )
    samples = CounterMetricFamily(
        f"{ns}_monitor_samples_total",
        "Samples fed to the live activation monitor since start (all workers).",
        labels=("model", "version"),
    )
    active = CounterMetricFamily(
        f"{ns}_activation_channel_active_samples_total",
        "Samples in which the channel was active at all, since start (all workers).",
        labels=("model", "version", "layer", "channel"),
    )
    activity = CounterMetricFamily(
        f"{ns}_activation_channel_activity_total",
        "Sum over samples of the channel's active rate, since start (all workers); divided by "
        "the samples, the channel's activity.",
        labels=("model", "version", "layer", "channel"),
    )
    for monitor in monitors:
        merged = monitor._merge()
        snapshot = monitor._summarise(merged)
        model, version = monitor.model, monitor.version
        window.add_metric([model], snapshot["samples"])
        has_reference.add_metric([model], 1.0 if snapshot["has_reference"] else 0.0)
        samples.add_metric([model, version], merged.total)
        for layer in snapshot["layers"]:
            name = layer["name"]
            _add_known(inactive, [model, name], layer["inactive_fraction"])
            _add_known(dead, [model, name], layer["dead_units"])
            _add_known(drift, [model, name], layer["drift"])  # None without a reference
            drifted.add_metric([model, name], 1.0 if layer["drifted"] else 0.0)
            columns = monitor._columns[name]
            counts = merged.total_active[columns].tolist()
            sums = (merged.total_activity[columns] / float(ACTIVITY_SCALE)).tolist()
            for channel, (count, total) in enumerate(zip(counts, sums, strict=True)):
                active.add_metric([model, version, name, str(channel)], count)
                activity.add_metric([model, version, name, str(channel)], total)
    return [inactive, dead, drift, drifted, has_reference, window, samples, active, activity]
