"""The model repository: Triton's layout ``root/<name>/<version>/model.onnx``, and the truth.

Versions are positive integers. A request without a version (or "latest") gets the model's
*default* version: the one pinned (at run time, else by ``default_versions``), else the
highest loaded.

The repository on disk is the truth; what a process serves follows it. Besides the model
files, each model folder may hold ``state.json`` (``ModelState``): the default version pinned
at run time and the versions unloaded at run time. A version folder dropped in by hand loads
by itself (Triton's poll mode); an unloaded version stays unloaded, across restarts, until
loaded again. Files and state are written atomically (a temporary file in the same folder,
fsync, ``os.replace``, fsync of the folder), read-modify-writes under ``repository_lock``
(an exclusive ``flock`` on ``<root>/.lock``), so several processes, and several replicas on
one volume, never lose each other's changes. ``load_all`` loads what the disk says at start;
``plan_sync`` and ``apply_sync`` (together ``sync``) make the published state equal to the
disk again later: new versions and changed files load (a file is hashed only when its stat
changed), versions that vanished or are unloaded in ``state.json`` drop, pins follow the
state files; a file that fails to load is listed in ``failures`` and a loaded copy keeps
serving. ``fingerprint`` is the cheap stat of all of it that tells a poller when to sync.

Hot swaps. Everything a reader needs (the table of loaded models, the pinned defaults, the
monitors) lives in one immutable ``_State`` that is replaced by a single assignment, never
mutated: a reader takes ``self._state`` once and has a consistent view, and a version becomes
visible only after it is fully loaded and warmed up. ``apply_sync`` publishes a new state
under a lock (one change at a time). Nothing is ever closed: an unloaded ``LoadedModel`` is
only dropped from the table, and a request that already holds it finishes on it; its sessions
are freed when the last reference goes (CPython's reference counting).

One ``ActivationMonitor`` per model name, bound to the version that serves by default: when a
change makes another version the default, the monitor is replaced, since its layers and
reference profile belong to one version. Feed it through ``record`` so that requests pinned
to other versions do not mix into the rolling statistics.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from service.core.files import write_atomically
from service.core.monitor import DEFAULT_DRIFT_THRESHOLD, ActivationMonitor, monitor_for
from service.core.reference import REFERENCE_FILENAME, ReferenceFileError, read_reference
from service.model_config import (
    CONFIG_FILENAME,
    ModelConfig,
    ModelConfigError,
    read_model_config,
)
from service.runtime.loaded_model import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
STATE_FILENAME = "state.json"
LOCK_FILENAME = ".lock"
LATEST = "latest"
DEFAULT_WINDOW = 1000

__all__ = ["ModelLoadError", "ModelNotFoundError", "ModelRepository", "ModelState"]


class ModelNotFoundError(LookupError):
    """No such model, or no such version of it; the message lists what is available."""

    def __init__(self, name: str, version: str | None, available: Mapping[str, Sequence[str]]):
        self.name = name
        self.version = version
        self.available = {k: list(v) for k, v in available.items()}
        if name not in available:
            listing = ", ".join(sorted(available)) or "none"
            message = f"unknown model {name!r}; available models: {listing}"
        else:
            listing = ", ".join(available[name])
            message = f"model {name!r} has no version {version!r}; available versions: {listing}"
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0])


def _version_key(version: str) -> int:
    return int(version)


def canonical_version(version: str | int) -> str:
    """``"07"``, ``7`` -> ``"7"``; ValueError for anything but a positive integer."""
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"version {version!r} is not a positive integer")
    return str(int(text))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# A model file's stat as a poller compares it: (mtime_ns, size, inode); None when absent.
FileKey = tuple[int, int, int]


def side_files_key(model_file: Path) -> tuple[FileKey | None, ...]:
    """The stats of the files read beside a model file: its version folder's reference.json
    and config.json, and its model folder's config.json (a labels file they name is not
    followed: touch the config.json after changing one)."""
    folder = model_file.parent
    return (
        file_key(folder / REFERENCE_FILENAME),
        file_key(folder / CONFIG_FILENAME),
        file_key(folder.parent / CONFIG_FILENAME),
    )


def file_key(path: Path) -> FileKey | None:
    """The stat of ``path`` that changes when the file is written or replaced; None if none."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass(frozen=True)
class ModelState:
    """A model's run-time state, kept in ``<root>/<name>/state.json``.

    ``default``: None when no default was set at run time (``default_versions`` applies), a
    version when one was pinned, ``LATEST`` when it was unpinned at run time (the highest
    serves, whatever the setting says). ``unloaded``: versions unloaded at run time; they
    stay unloaded, across restarts, until loaded again. File format::

        {"default": "3", "unloaded": ["1"]}
    """

    default: str | None = None
    unloaded: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (``default`` left out when not set at run time)."""
        data: dict[str, Any] = {"unloaded": sorted(self.unloaded, key=_version_key)}
        if self.default is not None:
            data = {"default": self.default, **data}
        return data

    @classmethod
    def from_json(cls, data: Any) -> ModelState:
        """Parse the file's JSON; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the state must be a JSON object")
        default = data.get("default")
        if default is not None:
            default = LATEST if str(default) == LATEST else canonical_version(default)
        unloaded = data.get("unloaded", [])
        if not isinstance(unloaded, list):
            raise ValueError("'unloaded' must be a list of versions")
        return cls(default=default, unloaded=frozenset(canonical_version(v) for v in unloaded))


def read_model_state(model_dir: Path) -> ModelState:
    """The state in ``model_dir/state.json``; empty when missing. A corrupt file never stops
    the service: it is logged and read as empty."""
    path = model_dir / STATE_FILENAME
    try:
        return ModelState.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return ModelState()
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeError are ValueErrors
        log.error("ignoring %s, read as empty: %s", path, exc)
        return ModelState()


def write_model_state(model_dir: Path, state: ModelState) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, ``os.replace``,
    fsync of the folder. Hold ``repository_lock`` around the read-modify-write."""
    model_dir.mkdir(exist_ok=True)
    write_atomically(model_dir / STATE_FILENAME, json.dumps(state.to_json()).encode() + b"\n")


@contextlib.contextmanager
def repository_lock(root: Path) -> Iterator[None]:
    """Hold the repository's exclusive lock (``flock`` on ``<root>/.lock``): one change of
    the disk at a time across processes and replicas. Blocks while another holds it, so take
    it in a thread. OSError when the lock file cannot be created (a read-only repository)."""
    fd = os.open(root / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


Monitors = dict[str, tuple[LoadedModel, ActivationMonitor]]
Table = dict[str, dict[str, LoadedModel]]


@dataclass(frozen=True)
class _State:
    """What readers see, replaced as a whole: loaded versions, pinned defaults, monitors, and
    what they were loaded from (each version's file stat, each model's state file)."""

    models: Table = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)  # name -> version set as default
    monitors: Monitors = field(default_factory=dict)
    keys: dict[tuple[str, str], FileKey | None] = field(default_factory=dict)
    states: dict[str, ModelState] = field(default_factory=dict)

    def default_of(self, name: str) -> str:
        """The version that serves ``name`` when no version is asked for."""
        return self.defaults[name]

    @cached_property
    def defaults(self) -> dict[str, str]:
        """Model name -> default version, worked out once per state (states are replaced,
        never changed, so every request naming no version need not sort versions)."""
        defaults: dict[str, str] = {}
        for name, versions in self.models.items():
            pinned = self.pinned.get(name)
            if pinned is None or pinned not in versions:  # none pinned, or not loaded
                pinned = max(versions, key=_version_key)
            defaults[name] = pinned
        return defaults


@dataclass
class SyncPlan:
    """What ``apply_sync`` would publish: the new table, the stat of each loaded file, the
    state files read, failures, changes, and the models dropped."""

    base: _State
    only: str | None = None
    table: Table = field(default_factory=dict)
    keys: dict[tuple[str, str], FileKey | None] = field(default_factory=dict)
    states: dict[str, ModelState] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    changes: dict[str, list[str]] = field(
        default_factory=lambda: {"loaded": [], "unloaded": [], "failed": []}
    )
    removed: list[LoadedModel] = field(default_factory=list)


class ModelRepository:
    """Every version of every model under ``root``, loaded, warmed up and monitored, as the
    files and state files on disk say."""

    def __init__(
        self,
        root: str | Path,
        *,
        providers: str | Sequence[str] = "cpu",
        threads: int | None = None,
        strict: bool = False,
        window: int = DEFAULT_WINDOW,
        drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
        share_weights: bool = False,
        skip_broken: bool = False,
        default_versions: Mapping[str, str | int] | None = None,
        gpu_batch: int = 64,
        monitor_factory: Callable[[LoadedModel], ActivationMonitor] | None = None,
    ):
        self.root = Path(root)
        self.gpu_batch = gpu_batch
        self.providers = providers
        self.threads = threads
        self.strict = strict
        self.window = window
        self.drift_threshold = drift_threshold
        # The default version's monitor; by default in memory, ``window`` its min_samples.
        self.monitor_factory = monitor_factory or partial(
            monitor_for, min_samples=window, drift_threshold=drift_threshold
        )
        self.share_weights = share_weights
        self.skip_broken = skip_broken
        # The setting's pins: they apply to models whose state file sets no default.
        self.configured_defaults = {
            name: canonical_version(v) for name, v in (default_versions or {}).items()
        }
        self._state = _State(pinned=dict(self.configured_defaults))
        self._change_lock = threading.RLock()  # one change at a time; readers never wait
        self.failures: dict[str, str] = {}  # file -> reason of the last failed load
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once ``load_all`` has loaded and warmed up every model."""
        return self._ready

    def discover(self) -> dict[str, list[str]]:
        """Model name -> version folders holding a model file, versions ascending."""
        if not self.root.is_dir():
            raise ModelLoadError(self.root, "the model repository folder does not exist")
        found: dict[str, list[str]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            versions = []
            for version_dir in model_dir.iterdir():
                if not version_dir.is_dir():
                    continue
                if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                    log.warning("ignoring %s: version folders are positive integers", version_dir)
                    continue
                if (version_dir / MODEL_FILENAME).is_file():
                    versions.append(str(int(version_dir.name)))
                else:
                    log.warning("ignoring %s: no %s inside", version_dir, MODEL_FILENAME)
            if versions:
                found[model_dir.name] = sorted(versions, key=_version_key)
        return found

    def fingerprint(self) -> tuple[Any, ...]:
        """A cheap picture of the disk (stats only, nothing read): every model folder's state
        file and version folders' model file and the files read beside it. It changes when a
        sync could change anything."""
        entries: list[tuple[str, str, FileKey | None, tuple[FileKey | None, ...] | None]] = []
        try:
            model_dirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        except OSError:
            return ()
        for name in model_dirs:
            if name.startswith("."):
                continue
            model_dir = self.root / name
            entries.append((name, "", file_key(model_dir / STATE_FILENAME), None))
            with contextlib.suppress(OSError):  # removed meanwhile: the next look sees it
                for version in sorted(e.name for e in os.scandir(model_dir) if e.is_dir()):
                    folder = model_dir / version
                    model_file = folder / MODEL_FILENAME
                    entries.append(
                        (name, version, file_key(model_file), side_files_key(model_file))
                    )
        return tuple(entries)

    def version_path(self, name: str, version: str) -> Path:
        """The model file of ``name``/``version`` on disk (the folder may be named "01")."""
        path = self.root / name / version / MODEL_FILENAME
        if path.is_file() or not (self.root / name).is_dir():
            return path
        return next(
            (
                p / MODEL_FILENAME
                for p in (self.root / name).iterdir()
                if p.name.isdigit()
                and str(int(p.name)) == version
                and (p / MODEL_FILENAME).is_file()
            ),
            path,
        )

    # ---- the state files (write under repository_lock) -------------------------------------

    def model_state(self, name: str) -> ModelState:
        """Model ``name``'s state file as it is on disk now (empty when none)."""
        return read_model_state(self.root / name)

    def update_model_state(
        self, name: str, change: Callable[[ModelState], ModelState]
    ) -> ModelState:
        """Read model ``name``'s state file, apply ``change``, write it back atomically (only
        when it changed). Hold ``repository_lock`` around it. Returns the new state."""
        before = self.model_state(name)
        after = change(before)
        if after != before:
            write_model_state(self.root / name, after)
        return after

    def pin_of(self, name: str, state: ModelState) -> str | None:
        """The version pinned as ``name``'s default: the state file's, else the setting's."""
        if state.default is not None:
            return None if state.default == LATEST else state.default
        return self.configured_defaults.get(name)

    def _pins(self, table: Table, states: Mapping[str, ModelState]) -> dict[str, str]:
        """The pins in effect: those naming a loaded version."""
        pins = {}
        for name, versions in table.items():
            pin = self.pin_of(name, states.get(name, ModelState()))
            if pin is not None and pin in versions:
                pins[name] = pin
        return pins

    # ---- loading ---------------------------------------------------------------------------

    def providers_for(self, name: str, config: ModelConfig | None = None) -> str | Sequence[str]:
        """The execution providers model ``name`` is loaded with: its config.json's, else the
        repository's (a hook for overrides)."""
        return config.providers if config and config.providers else self.providers

    def gpu_batch_for(self, name: str, config: ModelConfig | None = None) -> int:
        """The batch size model ``name``'s runs are padded to on a GPU (``LoadedModel.load``'s
        ``gpu_batch``; a hook for overrides)."""
        return self.gpu_batch

    def _load_version(self, name: str, version: str) -> LoadedModel:
        return self.load_file(self.version_path(name, version), name, version)

    def load_file(self, path: Path, name: str, version: str) -> LoadedModel:
        """Load and warm up one model file as ``name``/``version`` without publishing it, with
        the configuration beside it (``service.model_config``) and the reference profile of a
        ``reference.json`` beside it (``service.core.reference``)."""
        try:
            config = read_model_config(path)
        except ModelConfigError as exc:
            raise ModelLoadError(path, str(exc)) from None
        model = LoadedModel.load(
            path,
            name,
            version,
            providers=self.providers_for(name, config),
            threads=self.threads,
            strict=self.strict,
            share_weights=self.share_weights,
            gpu_batch=self.gpu_batch_for(name, config),
            config=config,
        )
        reference_path = path.parent / REFERENCE_FILENAME
        model.side_files_key = side_files_key(path)  # before reading them
        try:
            calibration = read_reference(reference_path, model.sha256, model.layers)
        except ReferenceFileError as exc:
            raise ModelLoadError(
                reference_path,
                f"{exc}; run python -m service calibrate {name} --version {version} again, "
                "or delete the file",
            ) from exc
        if calibration is not None:
            model.calibrated_reference = calibration.reference
        model.warm_up()
        return model

    def load_all(self) -> None:
        """Load and warm up every version the disk says serves (found, and not unloaded in
        its state file), then publish them all at once with the pins of the state files.

        A broken file raises ``ModelLoadError`` naming it (nothing is published), unless
        ``skip_broken``: then it is logged, listed in ``failures`` and left out.
        """
        table: Table = {}
        keys: dict[tuple[str, str], FileKey | None] = {}
        failures: dict[str, str] = {}
        found = self.discover()
        states = {name: self.model_state(name) for name in found}
        for name, versions in found.items():
            for version in versions:
                if version in states[name].unloaded:
                    log.info("model %s version %s stays unloaded (%s)", name, version,
                             STATE_FILENAME)  # fmt: skip
                    continue
                key = file_key(self.version_path(name, version))  # before reading it
                try:
                    loaded = self._load_version(name, version)
                except ModelLoadError as exc:
                    if not self.skip_broken:
                        raise
                    log.error("%s", exc)
                    failures[str(exc.path)] = exc.reason
                    continue
                table.setdefault(name, {})[version] = loaded
                keys[(name, version)] = key
                log.info(
                    "loaded model %s version %s (%d activation layers, providers %s)",
                    name, version, len(loaded.layers), ", ".join(loaded.providers.used),
                )  # fmt: skip
        if not table:
            log.warning("model repository %s holds no loadable model", self.root)
        self._check_pins(found, states)
        with self._change_lock:
            self._publish(table, self._pins(table, states), keys, states)
            self.failures = failures
        self._ready = True

    def _check_pins(self, found: Mapping[str, Sequence[str]], states: Mapping) -> None:
        """The setting's pins must name versions on disk (where no state file overrides)."""
        for name, version in self.configured_defaults.items():
            overridden = states.get(name, ModelState()).default is not None
            if name in found and version not in found[name] and not overridden:
                raise ModelLoadError(
                    self.root / name,
                    f"default version {version} of model {name!r} is not in the repository "
                    f"(default_versions); versions: {', '.join(found[name])}",
                )

    def _publish(
        self,
        table: Table,
        pinned: Mapping[str, str],
        keys: Mapping[tuple[str, str], FileKey | None] | None = None,
        states: Mapping[str, ModelState] | None = None,
    ) -> None:
        """Replace the state (one assignment); re-bind monitors whose default changed."""
        current = self._state
        next_state = _State(
            models=table,
            pinned=dict(pinned),
            keys=dict(current.keys if keys is None else keys),
            states=dict(current.states if states is None else states),
        )
        for name in table:
            default = table[name][next_state.default_of(name)]
            entry = current.monitors.get(name)
            if entry is None or entry[0] is not default:
                entry = (default, self.monitor_factory(default))
            next_state.monitors[name] = entry
        self._state = next_state

    # ---- reading (lock-free: one read of self._state) -------------------------------------

    def available(self) -> dict[str, list[str]]:
        """Loaded model name -> its versions, ascending."""
        table = self._state.models
        return {name: sorted(v, key=_version_key) for name, v in sorted(table.items())}

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """One loaded version; ``None`` or "latest" means the default version."""
        state = self._state  # one read: a concurrent publish cannot split this lookup
        versions = state.models.get(name)
        if versions is None:
            raise ModelNotFoundError(
                name, None if version is None else str(version), self.available()
            )
        if version is None or str(version) == LATEST:
            return versions[state.default_of(name)]
        key = str(version).strip()
        if key.isdigit():
            key = str(int(key))
        if key not in versions:
            raise ModelNotFoundError(name, str(version), self.available())
        return versions[key]

    def default_version(self, name: str) -> str:
        """The version that answers requests naming no version."""
        return self.get(name).version

    def names(self) -> Collection[str]:
        """Names of the loaded models (a live view of one state: cheap, read-only)."""
        return self._state.models.keys()

    def pinned_versions(self) -> dict[str, str]:
        """Models whose default is pinned (at run time, or by the setting) -> that version."""
        return dict(self._state.pinned)

    def list_models(self) -> list[dict[str, Any]]:
        """Every loaded model: name, versions (ascending), latest (the default) version, and
        since several processes follow one disk, ``default``, ``pinned`` and ``states``: each
        version on disk or loaded with its state (``version_states``)."""
        state = self._state
        index = {entry["name"]: entry for entry in self.index()}
        return [
            {
                "name": name,
                "versions": versions,
                "latest": state.default_of(name),
                "default": state.default_of(name),
                "pinned": state.pinned.get(name),
                "states": [
                    {k: v for k, v in entry.items() if k in ("version", "state", "reason")}
                    for entry in index[name]["versions"]
                ],
            }
            for name, versions in self.available().items()
        ]

    def index(self) -> list[dict[str, Any]]:
        """Every model version on disk or loaded, per model: its state (READY: loaded here;
        UNLOADED: unloaded at run time or not loaded yet; UNAVAILABLE: its file failed to
        load, with the reason), ``on_disk``, the sha256 of what serves; and each model's
        default and pinned version. The one source of ``/v1/models``' states, the management
        index and Triton's repository index."""
        state = self._state
        failures = self.failures
        on_disk = self.discover_or_empty()
        models = []
        for name in sorted(set(state.models) | set(on_disk)):
            loaded = state.models.get(name, {})
            versions = []
            for version in sorted(set(loaded) | set(on_disk.get(name, [])), key=_version_key):
                path = self.version_path(name, version)
                entry: dict[str, Any] = {"version": version, "on_disk": path.is_file()}
                if version in loaded:
                    entry["state"] = "READY"
                    entry["sha256"] = loaded[version].sha256
                elif str(path) in failures:
                    entry["state"] = "UNAVAILABLE"
                    entry["reason"] = failures[str(path)]
                else:
                    entry["state"] = "UNLOADED"
                versions.append(entry)
            models.append(
                {
                    "name": name,
                    "default": state.default_of(name) if loaded else None,
                    "pinned": state.pinned.get(name),
                    "versions": versions,
                }
            )
        return models

    def monitor(self, name: str) -> ActivationMonitor:
        """The activation monitor of model ``name`` (bound to its default version)."""
        entry = self._state.monitors.get(name)
        if entry is None:
            raise ModelNotFoundError(name, None, self.available())
        return entry[1]

    def record(self, model: LoadedModel, per_sample_active: Mapping[str, np.ndarray]) -> bool:
        """Feed a run's active rates to the model's monitor if ``model`` is the monitored
        (default) version; returns whether it was recorded."""
        entry = self._state.monitors.get(model.name)
        if entry is None or entry[0] is not model:
            return False
        entry[1].update(per_sample_active)
        return True

    # ---- following the disk (one change at a time; each publishes a new state or nothing) --

    def sync(self, only: str | None = None) -> dict[str, list[str]]:
        """Make the published state equal to the disk (``plan_sync`` then ``apply_sync``)."""
        with self._change_lock:
            return self.apply_sync(self.plan_sync(only))

    def plan_sync(
        self,
        only: str | None = None,
        preloaded: Mapping[tuple[str, str], tuple[LoadedModel, FileKey | None]] | None = None,
    ) -> SyncPlan:
        """The slow half of ``sync`` (of model ``only``, or of all): read the state files,
        load new versions and changed files, publish nothing. A loaded version whose file's
        stat is unchanged is kept without reading it; a changed stat is hashed and loads
        only when the bytes differ. ``preloaded``: versions already loaded from the file
        with that stat (an upload's validated model), used instead of loading again. A file
        that fails is listed in ``failures``; its loaded copy, if any, keeps serving."""
        state = self._state
        preloaded = preloaded or {}
        plan = SyncPlan(base=state, only=only)
        found = self.discover()
        if only is not None:
            found = {only: found[only]} if only in found else {}
            plan.table = {n: dict(v) for n, v in state.models.items() if n != only}
            plan.keys = {k: v for k, v in state.keys.items() if k[0] != only}
            plan.states = {n: s for n, s in state.states.items() if n != only}
            plan.failures = {
                path: reason
                for path, reason in self.failures.items()
                if Path(path).parent.parent.name != only
            }
        for name, versions in found.items():
            disk = plan.states[name] = self.model_state(name)
            for version in versions:
                if version not in disk.unloaded:
                    self._plan_version(plan, name, version, preloaded.get((name, version)))
        for name, loaded_versions in state.models.items():
            for version, model in loaded_versions.items():
                if version not in plan.table.get(name, {}):  # gone from disk, or unloaded
                    plan.changes["unloaded"].append(f"{name}/{version}")
                    plan.removed.append(model)
        return plan

    def _plan_version(
        self,
        plan: SyncPlan,
        name: str,
        version: str,
        preloaded: tuple[LoadedModel, FileKey | None] | None,
    ) -> None:
        """Put one version that should serve into ``plan``: kept, loaded, or failed."""
        state = plan.base
        current = state.models.get(name, {}).get(version)
        path = self.version_path(name, version)
        key = file_key(path)  # before reading: a write meanwhile shows at the next look
        # A reference.json or config.json written, replaced or removed beside the file loads
        # the version again (its monitor then compares with the new profile).
        side_key = side_files_key(path)
        try:
            if (
                current is not None
                and key is not None
                and state.keys.get((name, version)) == key
                and current.side_files_key == side_key
            ):
                loaded = current  # unchanged stat: not even read
            elif (
                preloaded is not None
                and key is not None
                and preloaded[1] == key
                and preloaded[0].side_files_key == side_key
            ):
                loaded = preloaded[0]
            elif (
                current is not None
                and current.side_files_key == side_key
                and file_sha256(path) == current.sha256
            ):
                loaded = current  # touched or copied, same bytes
            else:
                loaded = self._load_version(name, version)
        except (ModelLoadError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            log.error("sync: %s/%s: %s", name, version, reason)
            plan.failures[str(path)] = reason
            plan.changes["failed"].append(f"{name}/{version}")
            if current is not None:
                plan.table.setdefault(name, {})[version] = current
                plan.keys[(name, version)] = state.keys.get((name, version))
            return
        plan.table.setdefault(name, {})[version] = loaded
        plan.keys[(name, version)] = key
        if loaded is not current:
            plan.changes["loaded"].append(f"{name}/{version}")
            log.info("sync: loaded model %s version %s", name, version)

    def apply_sync(self, plan: SyncPlan) -> dict[str, list[str]]:
        """The fast half of ``sync``: publish a plan, with the pins its state files give.
        Changes published since the plan was made would be lost, so make and apply plans
        under one lock (the model manager serializes its operations and its poller)."""
        with self._change_lock:
            if self._state is not plan.base:
                raise RuntimeError("the repository changed while a sync was planned")
            self._publish(plan.table, self._pins(plan.table, plan.states), plan.keys, plan.states)
            self.failures = plan.failures
            return plan.changes

    def discover_or_empty(self) -> dict[str, list[str]]:
        """``discover`` that answers {} when the root folder is missing."""
        try:
            return self.discover()
        except ModelLoadError:
            return {}
