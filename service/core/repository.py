"""The model repository: Triton's layout ``root/<name>/<version>/model.onnx``.

Versions are positive integers. A request without a version (or "latest") gets the model's
*default* version: the one pinned with ``set_default`` (or ``default_versions`` at start-up),
else the highest loaded. ``load_all`` loads and warms up every version it finds and only then
publishes them.

Hot swaps. Everything a reader needs (the table of loaded models, the pinned defaults, the
monitors) lives in one immutable ``_State`` that is replaced by a single assignment, never
mutated: a reader takes ``self._state`` once and has a consistent view, and a version becomes
visible only after it is fully loaded and warmed up. ``load_version``, ``add_version``,
``unload_version``, ``set_default`` and ``reload`` build a new state under a lock (one change
at a time) and publish it. Nothing is ever closed: an unloaded ``LoadedModel`` is only dropped
from the table, and a request that already holds it finishes on it; its sessions are freed
when the last reference goes (CPython's reference counting).

One ``ActivationMonitor`` per model name, bound to the version that serves by default: when a
change makes another version the default, the monitor is replaced, since its layers and
reference profile belong to one version. Feed it through ``record`` so that requests pinned
to other versions do not mix into the rolling statistics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from service.core.monitor import DEFAULT_DRIFT_THRESHOLD, ActivationMonitor, monitor_for
from service.runtime.loaded_model import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
LATEST = "latest"
DEFAULT_WINDOW = 1000

__all__ = ["ModelLoadError", "ModelNotFoundError", "ModelRepository"]


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


Monitors = dict[str, tuple[LoadedModel, ActivationMonitor]]


@dataclass(frozen=True)
class _State:
    """What readers see, replaced as a whole: loaded versions, pinned defaults, monitors."""

    models: dict[str, dict[str, LoadedModel]] = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)  # name -> version set as default
    monitors: Monitors = field(default_factory=dict)

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
class ReloadPlan:
    """What ``reload`` would publish: the new table, failures, changes, dropped models."""

    base: _State
    table: dict[str, dict[str, LoadedModel]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    changes: dict[str, list[str]] = field(
        default_factory=lambda: {"loaded": [], "unloaded": [], "failed": []}
    )
    removed: list[LoadedModel] = field(default_factory=list)


class ModelRepository:
    """Every version of every model under ``root``, loaded, warmed up and monitored."""

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
        self._state = _State(
            pinned={name: canonical_version(v) for name, v in (default_versions or {}).items()}
        )
        self._change_lock = threading.RLock()  # one change at a time; readers never wait
        self.failures: dict[str, str] = {}  # file -> reason, with skip_broken
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

    def providers_for(self, name: str) -> str | Sequence[str]:
        """The execution providers model ``name`` is loaded with (a hook for overrides)."""
        return self.providers

    def gpu_batch_for(self, name: str) -> int:
        """The batch size model ``name``'s runs are padded to on a GPU (``LoadedModel.load``'s
        ``gpu_batch``; a hook for overrides)."""
        return self.gpu_batch

    def _load_version(self, name: str, version: str) -> LoadedModel:
        return self.load_file(self.version_path(name, version), name, version)

    def load_file(self, path: Path, name: str, version: str) -> LoadedModel:
        """Load and warm up one model file as ``name``/``version`` without publishing it."""
        model = LoadedModel.load(
            path,
            name,
            version,
            providers=self.providers_for(name),
            threads=self.threads,
            strict=self.strict,
            share_weights=self.share_weights,
            gpu_batch=self.gpu_batch_for(name),
        )
        model.warm_up()
        return model

    def load_all(self) -> None:
        """Load and warm up every version found, then publish them all at once.

        A broken file raises ``ModelLoadError`` naming it (nothing is published), unless
        ``skip_broken``: then it is logged, listed in ``failures`` and left out.
        """
        table: dict[str, dict[str, LoadedModel]] = {}
        failures: dict[str, str] = {}
        for name, versions in self.discover().items():
            for version in versions:
                try:
                    loaded = self._load_version(name, version)
                except ModelLoadError as exc:
                    if not self.skip_broken:
                        raise
                    log.error("%s", exc)
                    failures[str(exc.path)] = exc.reason
                    continue
                table.setdefault(name, {})[version] = loaded
                log.info(
                    "loaded model %s version %s (%d activation layers, providers %s)",
                    name, version, len(loaded.layers), ", ".join(loaded.providers.used),
                )  # fmt: skip
        if not table:
            log.warning("model repository %s holds no loadable model", self.root)
        with self._change_lock:
            self._check_pins(table, self._state.pinned)
            self._publish(table, self._state.pinned)
            self.failures = failures
        self._ready = True

    def _check_pins(self, table: Mapping[str, Mapping[str, LoadedModel]], pinned: Mapping) -> None:
        for name, version in pinned.items():
            if name in table and version not in table[name]:
                raise ModelLoadError(
                    self.root / name,
                    f"default version {version} of model {name!r} is not in the repository "
                    f"(default_versions); versions: {', '.join(sorted(table[name], key=int))}",
                )

    def _publish(self, table: dict[str, dict[str, LoadedModel]], pinned: Mapping[str, str]) -> None:
        """Replace the state (one assignment); re-bind monitors whose default changed."""
        current = self._state
        next_state = _State(models=table, pinned=dict(pinned))
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
        """Models whose default was set explicitly -> that version."""
        return dict(self._state.pinned)

    def list_models(self) -> list[dict]:
        """Every loaded model: name, versions (ascending), latest (the default) version."""
        state = self._state
        return [
            {"name": name, "versions": versions, "latest": state.default_of(name)}
            for name, versions in self.available().items()
        ]

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

    # ---- changing (one at a time; each publishes a new state or nothing) ------------------

    def add_version(self, model: LoadedModel, *, default: bool | None = None) -> None:
        """Publish a loaded, warmed-up ``model`` (replacing a loaded version of the same
        number). ``default``: True pins it as the default; False keeps the current default
        serving (pinning it); None: the usual rule (pinned, else the highest)."""
        with self._change_lock:
            state = self._state
            pinned = dict(state.pinned)
            if default is False and model.name in state.models:
                pinned[model.name] = state.default_of(model.name)
            elif default:
                pinned[model.name] = model.version
            table = dict(state.models)
            table[model.name] = {**table.get(model.name, {}), model.version: model}
            self._publish(table, pinned)
            self.failures.pop(str(self.version_path(model.name, model.version)), None)

    def load_version(
        self, name: str, version: str | int, *, default: bool | None = None
    ) -> LoadedModel:
        """Load (or reload) one version from disk, warm it up, then publish it. A file that
        fails raises ``ModelLoadError`` and changes nothing: a loaded copy keeps serving."""
        version = canonical_version(version)
        with self._change_lock:
            if not self.version_path(name, version).is_file():
                raise ModelNotFoundError(name, version, self.discover_or_empty())
            model = self._load_version(name, version)
            self.add_version(model, default=default)
            return model

    def unload_version(self, name: str, version: str | int) -> LoadedModel:
        """Stop serving one version (its file stays). Requests already holding it finish on
        it. Unloading the pinned default is refused (``ValueError``): set another first."""
        version = canonical_version(version)
        with self._change_lock:
            state = self._state
            model = self.get(name, version)
            if state.pinned.get(name) == version and len(state.models[name]) > 1:
                raise ValueError(
                    f"version {version} is the default version of model {name!r}; "
                    "set another default version first"
                )
            table = dict(state.models)
            remaining = {v: m for v, m in table[name].items() if v != version}
            pinned = dict(state.pinned)
            if remaining:
                table[name] = remaining
            else:
                del table[name]
                pinned.pop(name, None)
            self._publish(table, pinned)
            return model

    def set_default(self, name: str, version: str | int | None) -> str:
        """Pin the version that serves requests naming none; ``None`` or "latest" unpins
        (the highest serves). Returns the default version now."""
        with self._change_lock:
            state = self._state
            if name not in state.models:
                raise ModelNotFoundError(name, None, self.available())
            pinned = dict(state.pinned)
            if version is None or str(version).strip() == LATEST:
                pinned.pop(name, None)
            else:
                pinned[name] = self.get(name, version).version  # 404 for an unknown version
            self._publish(dict(state.models), pinned)
            return self._state.default_of(name)

    def reload(self) -> dict[str, list[str]]:
        """Make the loaded set mirror the disk: load new versions and changed files (and
        versions unloaded since), drop versions whose file is gone, keep unchanged ones as
        they are. Loads everything first,
        then publishes once; a broken file is skipped and listed in ``failures`` (its loaded
        copy, if any, keeps serving). Returns what changed: loaded, unloaded, failed."""
        with self._change_lock:
            return self.apply_reload(self.plan_reload())

    def plan_reload(self, only: str | None = None) -> ReloadPlan:
        """The slow half of ``reload``: load what changed on disk (of model ``only``, or of
        all), publish nothing."""
        state = self._state
        plan = ReloadPlan(base=state)
        found = self.discover()
        if only is not None:
            found = {only: found[only]} if only in found else {}
            plan.table = {n: v for n, v in state.models.items() if n != only}
        for name, versions in found.items():
            for version in versions:
                current = state.models.get(name, {}).get(version)
                path = self.version_path(name, version)
                try:
                    if current is not None and file_sha256(path) == current.sha256:
                        plan.table.setdefault(name, {})[version] = current
                        continue
                    loaded = self._load_version(name, version)
                except (ModelLoadError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or str(exc)
                    log.error("reload: %s/%s: %s", name, version, reason)
                    plan.failures[str(path)] = reason
                    plan.changes["failed"].append(f"{name}/{version}")
                    if current is not None:
                        plan.table.setdefault(name, {})[version] = current
                    continue
                plan.table.setdefault(name, {})[version] = loaded
                plan.changes["loaded"].append(f"{name}/{version}")
        for name, loaded_versions in state.models.items():
            for version, model in loaded_versions.items():
                if version not in plan.table.get(name, {}):  # gone from disk
                    plan.changes["unloaded"].append(f"{name}/{version}")
                    plan.removed.append(model)
        return plan

    def apply_reload(self, plan: ReloadPlan) -> dict[str, list[str]]:
        """The fast half of ``reload``: publish a plan (pins of vanished versions dropped).
        Changes published since the plan was made are lost, so make and apply plans under
        one lock (the management API serializes its operations)."""
        with self._change_lock:
            if self._state is not plan.base:
                raise RuntimeError("the repository changed while a reload was planned")
            state = self._state
            pinned = {n: v for n, v in state.pinned.items() if v in plan.table.get(n, {})}
            self._publish(plan.table, pinned)
            self.failures = plan.failures
            return plan.changes

    def discover_or_empty(self) -> dict[str, list[str]]:
        """``discover`` that answers {} when the root folder is missing."""
        try:
            return self.discover()
        except ModelLoadError:
            return {}
