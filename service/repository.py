"""The model repository: Triton's layout ``root/<name>/<version>/model.onnx``.

Versions are positive integers; "latest" (or no version) is the highest. ``load_all`` loads
and warms up every version it finds and only then publishes them: the table of loaded models
is a dict that is replaced as a whole, never mutated, so a reader holding the old table keeps
a consistent view while a new one is built (the management API, a later issue, will reuse
this for load, unload and reload).

One ``ActivationMonitor`` per model name, bound to the version that serves "latest": when a
(re)load changes which version that is, the monitor is replaced, since its layers and
reference profile belong to one version. Feed it through ``record`` so that requests pinned
to other versions do not mix into the rolling statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from service.model import LoadedModel, ModelLoadError
from service.monitor import DEFAULT_DRIFT_THRESHOLD, ActivationMonitor

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
        return self.args[0]


def _version_key(version: str) -> int:
    return int(version)


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
    ):
        self.root = Path(root)
        self.providers = providers
        self.threads = threads
        self.strict = strict
        self.window = window
        self.drift_threshold = drift_threshold
        self.share_weights = share_weights
        self.skip_broken = skip_broken
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._monitors: dict[str, tuple[LoadedModel, ActivationMonitor]] = {}
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

    def _load_version(self, name: str, version: str) -> LoadedModel:
        path = self.root / name / version / MODEL_FILENAME
        if not path.is_file():  # the folder may be named "01"
            path = next(
                p / MODEL_FILENAME
                for p in (self.root / name).iterdir()
                if p.name.isdigit() and str(int(p.name)) == version
            )
        model = LoadedModel.load(
            path,
            name,
            version,
            providers=self.providers,
            threads=self.threads,
            strict=self.strict,
            share_weights=self.share_weights,
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
        self._publish(table)
        self.failures = failures
        self._ready = True

    def _publish(self, table: dict[str, dict[str, LoadedModel]]) -> None:
        """Replace the table (one assignment) and re-bind monitors whose latest changed."""
        monitors = {}
        for name, versions in table.items():
            latest = versions[max(versions, key=_version_key)]
            current = self._monitors.get(name)
            if current is not None and current[0] is latest:
                monitors[name] = current
            else:
                monitors[name] = (
                    latest,
                    ActivationMonitor(
                        latest.layers, latest.reference, self.window, self.drift_threshold
                    ),
                )
        self._models = table
        self._monitors = monitors

    def available(self) -> dict[str, list[str]]:
        """Loaded model name -> its versions, ascending."""
        table = self._models
        return {name: sorted(v, key=_version_key) for name, v in sorted(table.items())}

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """One loaded version; ``None`` or "latest" means the highest."""
        table = self._models  # one read: a concurrent publish cannot split this lookup
        versions = table.get(name)
        if versions is None:
            raise ModelNotFoundError(
                name, None if version is None else str(version), self.available()
            )
        if version is None or str(version) == LATEST:
            return versions[max(versions, key=_version_key)]
        key = str(version).strip()
        if key.isdigit():
            key = str(int(key))
        if key not in versions:
            raise ModelNotFoundError(name, str(version), self.available())
        return versions[key]

    def list_models(self) -> list[dict]:
        """Every loaded model: name, versions (ascending), latest version."""
        return [
            {"name": name, "versions": versions, "latest": versions[-1]}
            for name, versions in self.available().items()
        ]

    def monitor(self, name: str) -> ActivationMonitor:
        """The activation monitor of model ``name`` (bound to its latest version)."""
        entry = self._monitors.get(name)
        if entry is None:
            raise ModelNotFoundError(name, None, self.available())
        return entry[1]

    def record(self, model: LoadedModel, per_sample_active: Mapping[str, np.ndarray]) -> bool:
        """Feed a run's active rates to the model's monitor if ``model`` is the monitored
        (latest) version; returns whether it was recorded."""
        entry = self._monitors.get(model.name)
        if entry is None or entry[0] is not model:
            return False
        entry[1].update(per_sample_active)
        return True
