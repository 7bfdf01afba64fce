"""Model management, independent of HTTP: upload, load, unload, delete, default, reload.

Safety rules, in the order an upload meets them:

1. **Staged, never in place.** The body streams into ``<root>/.staging/upload-*/model.onnx``
   (same file system as the repository, so the final move is a rename; ``discover`` skips
   dot-folders) with a size limit, then ``fsync``.
2. **Validated before it serves.** The staged file is loaded (ONNX check, our metadata,
   labels against the output, the input), its preprocessing is checked against the input
   shape, and it runs on zeros with and without statistics (a warm-up that must succeed).
   A bad file is answered 422 naming the problem; the repository and what serves are as
   before.
3. **Installed atomically.** A new version folder is renamed into place whole
   (``os.replace``); a replaced file is renamed over the old one; then the parent folder is
   fsynced. A crash at any point leaves either the old state or the new one on disk, plus at
   worst a leftover in ``.staging/`` that nothing reads.
4. **Published in one step.** Only then does the repository publish a new state (one
   assignment): requests see the old version or the complete new one, never a half-loaded
   one. Replaced or unloaded versions are never closed: requests holding them finish on them.

Operations are serialized by one ``asyncio.Lock``; slow work (loading, fsync) runs in worker
threads, and every change of the repository's state is published from the event loop
thread, so synchronous code on the loop (a metrics scrape, a route) never sees the table
change in the middle of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from service.core.dataplane import DataPlane
from service.core.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
    UnprocessableError,
)
from service.core.repository import (
    MODEL_FILENAME,
    ModelNotFoundError,
    ModelRepository,
    canonical_version,
)
from service.runtime.loaded_model import LoadedModel, ModelLoadError

logger = logging.getLogger(__name__)

# Model names become folder names: no separators, no leading dot (hidden, or "..").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
VERSION_PATTERN = r"^0*[1-9][0-9]{0,8}$"
STAGING_DIR = ".staging"
# Guess for dynamic non-batch input dims the metadata does not size (as LoadedModel.warm_up).
_GUESSED_DIM = 32
_WARMUP_BATCH = 2  # > 1: proves the batch axis is really dynamic


class ConflictError(ServiceError):
    """The request contradicts the repository's state (an existing version, the default)."""

    status_code = 409
    code = "conflict"


class StorageError(ServiceError):
    """The repository folder cannot be written (read-only, full): 507 Insufficient Storage."""

    status_code = 507
    code = "storage_error"


def check_name(name: str) -> str:
    """A model name that is safe as a folder name; 400 otherwise."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise BadRequestError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def check_version(version: str | int) -> str:
    """A version as the repository spells it ("007" -> "7"); 400 unless a positive integer."""
    text = str(version)
    if not re.fullmatch(VERSION_PATTERN, text.strip()):
        raise BadRequestError(
            f"invalid version {version!r}: versions are positive integers", code="invalid_version"
        )
    return canonical_version(text)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(action: str, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot {action} in the model repository ({exc.strerror or exc}); "
        "it must be a writable folder (RELU_SERVE_MODEL_ROOT) with free space"
    )


def _write(file: Any, chunk: bytes) -> None:
    try:
        file.write(chunk)
    except OSError as exc:
        raise _storage_error("stage an upload", exc) from exc


def _sync(file: Any) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    except OSError as exc:
        raise _storage_error("stage an upload", exc) from exc


def warmup_shape(model: LoadedModel) -> list[int]:
    """A concrete input shape for a validation run: batch 2, sizes from the preprocessing
    metadata for dynamic image dims, a guess for others."""
    shape = model.input_shape
    prep = model.preprocessing
    dims = [_WARMUP_BATCH]
    for axis, dim in enumerate(shape[1:], start=1):
        if dim is None:
            if prep is not None and len(shape) == 4:
                dim = (prep.channels, prep.height, prep.width)[axis - 1]
            else:
                dim = _GUESSED_DIM
        dims.append(dim)
    return dims


def check_servable(model: LoadedModel) -> None:
    """What ``LoadedModel.load`` leaves to the server: the preprocessing fits the input, the
    batch axis is dynamic, and a run gives one finite row per sample and label, with and
    without statistics. Raises ``ModelLoadError`` naming the problem."""
    path, shape, prep = model.path, model.input_shape, model.preprocessing
    if shape and shape[0] is not None:
        raise ModelLoadError(
            path,
            f"input {model.input_name!r} has a fixed batch size of {shape[0]}; the service "
            "batches requests together: export with a dynamic batch axis",
        )
    if prep is not None:
        if len(shape) != 4:
            raise ModelLoadError(
                path,
                f"the metadata's preprocessing makes images (N, C, H, W) but input "
                f"{model.input_name!r} has rank {len(shape)}",
            )
        wanted = {"channels": prep.channels, "height": prep.height, "width": prep.width}
        for axis, (what, want) in enumerate(wanted.items(), start=1):
            if shape[axis] is not None and shape[axis] != want:
                raise ModelLoadError(
                    path,
                    f"the metadata's preprocessing gives {what} {want} but input "
                    f"{model.input_name!r} has {shape[axis]} (dim {axis})",
                )
    x = np.zeros(warmup_shape(model), dtype=model.input_dtype)
    modes = ["none", "summary"] if model.has_statistics else ["none"]
    for mode in modes:
        try:
            result = model.run(x, mode)
        except Exception as exc:
            raise ModelLoadError(
                path, f"a run on zeros of shape {list(x.shape)} failed ({exc})"
            ) from exc
        out = result.probabilities
        labels = len(model.labels) if model.labels else None
        if out.ndim != 2 or out.shape[0] != x.shape[0] or (labels and out.shape[1] != labels):
            raise ModelLoadError(
                path,
                f"output {model.output_name!r} has shape {list(out.shape)} for a batch of "
                f"{x.shape[0]}; expected [{x.shape[0]}, {labels or 'classes'}]",
            )
        if not np.isfinite(out).all():
            raise ModelLoadError(path, "a run on zeros gave non-finite outputs")


class ModelManager:
    """Management operations on the data plane's repository; each returns a JSON-ready dict."""

    def __init__(self, plane: DataPlane, max_upload_bytes: int) -> None:
        self.plane = plane
        self.max_upload_bytes = max_upload_bytes
        self._lock = asyncio.Lock()

    @property
    def repository(self) -> ModelRepository:
        """The loaded repository; 503 while models are still loading."""
        if self.plane.repository is None:
            raise ServiceUnavailableError("models are still loading; try again shortly")
        return self.plane.repository

    # ------------------------------------------------------------------ reading

    def index(self) -> dict[str, Any]:
        """Every model version on disk or loaded: its state (READY, UNLOADED or
        UNAVAILABLE with the reason), and each model's default version."""
        repo = self.repository
        loaded = repo.available()
        on_disk = repo.discover_or_empty()
        pinned = repo.pinned_versions()
        failures = repo.failures
        models = []
        for name in sorted(set(loaded) | set(on_disk)):
            versions = []
            numbers = set(loaded.get(name, [])) | set(on_disk.get(name, []))
            for version in sorted(numbers, key=int):
                path = repo.version_path(name, version)
                entry: dict[str, Any] = {"version": version, "on_disk": path.is_file()}
                if version in loaded.get(name, []):
                    entry["state"] = "READY"
                    entry["sha256"] = repo.get(name, version).sha256
                elif str(path) in failures:
                    entry["state"] = "UNAVAILABLE"
                    entry["reason"] = failures[str(path)]
                else:
                    entry["state"] = "UNLOADED"
                versions.append(entry)
            models.append(
                {
                    "name": name,
                    "default": repo.default_version(name) if name in loaded else None,
                    "pinned": pinned.get(name),
                    "versions": versions,
                }
            )
        return {"models": models}

    def _model_summary(self, name: str) -> dict[str, Any]:
        repo = self.repository
        versions = repo.available().get(name, [])
        return {
            "name": name,
            "versions": versions,
            "default": repo.default_version(name) if versions else None,
            "pinned": repo.pinned_versions().get(name),
        }

    # ------------------------------------------------------------------ upload

    async def upload(
        self,
        name: str,
        version: str | int | None,
        chunks: AsyncIterable[bytes],
        *,
        overwrite: bool = False,
        default: bool | None = None,
    ) -> dict[str, Any]:
        """Stage, validate, install and publish a model file as ``name``/``version`` (the
        next free version when None). 409 if the version exists and not ``overwrite``;
        422 naming the problem if the file cannot serve (then nothing changed)."""
        check_name(name)
        wanted = None if version is None else check_version(version)
        repo = self.repository
        staged = await self._stage(repo.root, chunks)
        try:
            async with self._lock:
                version = wanted or self._next_version(repo, name)
                target = repo.version_path(name, version)
                replaced = target.is_file()
                if replaced and not overwrite:
                    raise ConflictError(
                        f"model {name!r} already has version {version}; send overwrite=true "
                        "to replace it, or upload another version",
                        code="version_exists",
                    )
                model = await self._validate(staged / MODEL_FILENAME, name, version)
                try:
                    await anyio.to_thread.run_sync(self._install, repo, staged, name, version)
                except OSError as exc:
                    raise _storage_error("install the uploaded file", exc) from exc
                model.path = repo.version_path(name, version)  # the same bytes, now in place
                previous = repo.available().get(name, [])
                old = repo.get(name, version) if version in previous else None
                repo.add_version(model, default=default)
                self.plane.models_changed(removed=[old] if old else [])
                logger.info(
                    "management: %s model %s version %s (sha256 %s)",
                    "replaced" if replaced else "added",
                    name,
                    version,
                    model.sha256[:12],
                )
                return {
                    "model": name,
                    "version": version,
                    "state": "READY",
                    "replaced": replaced,
                    "sha256": model.sha256,
                    "default": repo.default_version(name),
                }
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    async def _stage(self, root: Path, chunks: AsyncIterable[bytes]) -> Path:
        """Stream ``chunks`` into a new staging folder's model file, fsynced; the folder."""
        try:
            staging = root / STAGING_DIR
            staging.mkdir(exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="upload-", dir=staging))
        except OSError as exc:
            raise _storage_error("stage an upload", exc) from exc
        size = 0
        try:
            file = open(folder / MODEL_FILENAME, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise _storage_error("stage an upload", exc) from exc
        try:
            with file:
                async for chunk in chunks:  # a client gone mid-body raises here, as itself
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise PayloadTooLargeError(
                            f"model file of more than {size - len(chunk)} bytes is over the "
                            f"limit of {self.max_upload_bytes} bytes (max_upload_bytes)",
                            code="upload_too_large",
                        )
                    _write(file, chunk)  # page cache: microseconds per chunk
                if size == 0:
                    raise BadRequestError(
                        "empty upload: the request carries no model file", code="empty_upload"
                    )
                await anyio.to_thread.run_sync(_sync, file)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    async def _validate(self, path: Path, name: str, version: str) -> LoadedModel:
        """Load, warm up and check a file as ``name``/``version``: 422 naming the problem."""
        repo = self.repository

        def work() -> LoadedModel:
            model = repo.load_file(path, name, version)
            check_servable(model)
            return model

        try:
            return await anyio.to_thread.run_sync(work)
        except ModelLoadError as exc:
            reason = exc.reason
        except Exception as exc:  # a graph that trips the loader in a way nobody foresaw
            logger.exception("validating an upload of %s version %s", name, version)
            reason = f"the model could not be loaded ({type(exc).__name__}: {exc})"
        serving = repo.available().get(name)
        keeps = (
            f"; version {repo.default_version(name)} keeps serving"
            if serving
            else "; nothing changed"
        )
        raise UnprocessableError(
            f"model file for {name!r} version {version} rejected: {reason}{keeps}",
            code="invalid_model",
        )

    @staticmethod
    def _next_version(repo: ModelRepository, name: str) -> str:
        """One more than any version on disk, loaded, or with a folder."""
        numbers = [int(v) for v in repo.available().get(name, [])]
        folder = repo.root / name
        if folder.is_dir():
            numbers += [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        return str(max(numbers, default=0) + 1)

    @staticmethod
    def _install(repo: ModelRepository, staged: Path, name: str, version: str) -> None:
        """Move a validated staged file into place atomically and make the rename durable."""
        model_dir = repo.root / name
        created = not model_dir.is_dir()
        model_dir.mkdir(exist_ok=True)
        target = repo.version_path(name, version)
        if target.parent.is_dir():  # replace the file inside the existing version folder
            os.replace(staged / MODEL_FILENAME, target)
            _fsync_dir(target.parent)
        else:  # a new version: rename the whole staged folder into place
            os.replace(staged, target.parent)
            _fsync_dir(model_dir)
        if created:
            _fsync_dir(repo.root)

    # ------------------------------------------------------------------ load, unload

    async def load(self, name: str, version: str | int, default: bool | None = None) -> dict:
        """Load (or reload) one version from its file on disk, validated like an upload."""
        check_name(name)
        version = check_version(version)
        async with self._lock:
            repo = self.repository
            path = repo.version_path(name, version)
            if not path.is_file():
                disk = repo.discover_or_empty().get(name, [])
                raise NotFoundError(
                    f"model {name!r} has no version {version} on disk; versions on disk: "
                    f"{', '.join(disk) or 'none'}",
                    code="model_not_found",
                )
            model = await self._validate(path, name, version)
            old = repo.get(name, version) if version in repo.available().get(name, []) else None
            repo.add_version(model, default=default)
            self.plane.models_changed(removed=[old] if old else [])
            return {"model": name, "version": version, "state": "READY", "sha256": model.sha256}

    async def unload(self, name: str, version: str | int) -> dict[str, Any]:
        """Stop serving one version; its file stays (``reload`` would load it again)."""
        version = check_version(version)
        async with self._lock:
            model = self._unload(name, version)
            self.plane.models_changed(removed=[model])
            return {"model": name, "version": version, "state": "UNLOADED"}

    def _unload(self, name: str, version: str) -> LoadedModel:
        try:
            return self.repository.unload_version(name, version)
        except ValueError as exc:  # the pinned default
            raise ConflictError(str(exc), code="version_is_default") from None

    async def delete(self, name: str, version: str | int) -> dict[str, Any]:
        """Unload one version and remove its folder from disk (renamed away first, so a
        crash leaves it either whole in place or gone)."""
        check_name(name)
        version = check_version(version)
        async with self._lock:
            repo = self.repository
            path = repo.version_path(name, version)
            loaded = version in repo.available().get(name, [])
            if not loaded and not path.parent.is_dir():
                raise ModelNotFoundError(name, version, repo.discover_or_empty())
            if loaded:
                model = self._unload(name, version)
                self.plane.models_changed(removed=[model])
            if path.parent.is_dir():

                def remove() -> None:
                    trash = Path(tempfile.mkdtemp(prefix="deleted-", dir=repo.root / STAGING_DIR))
                    os.replace(path.parent, trash / version)
                    _fsync_dir(path.parent.parent)
                    shutil.rmtree(trash, ignore_errors=True)

                try:
                    (repo.root / STAGING_DIR).mkdir(exist_ok=True)
                    await anyio.to_thread.run_sync(remove)
                except OSError as exc:
                    raise _storage_error("delete the version folder", exc) from exc
            return {"model": name, "version": version, "state": "DELETED"}

    async def set_default(self, name: str, version: str | int | None) -> dict[str, Any]:
        """Pin the version that serves requests naming none; None unpins (highest serves)."""
        if version is not None and str(version).strip() != "latest":
            version = check_version(version)
        async with self._lock:
            previous = self.repository.default_version(name) if name in self._names() else None
            self.repository.set_default(name, version)
            return {**self._model_summary(name), "previous_default": previous}

    def _names(self) -> list[str]:
        return list(self.repository.available())

    async def reload(self, name: str | None = None) -> dict[str, Any]:
        """Make what is loaded mirror the disk (one model, or all): new versions and changed
        files load, vanished ones unload; broken files are reported and skipped."""
        if name is not None:
            check_name(name)
        async with self._lock:
            repo = self.repository
            try:
                plan = await anyio.to_thread.run_sync(repo.plan_reload, name)
            except ModelLoadError as exc:  # the root folder itself is gone
                raise _storage_error("read the model repository", OSError(exc.reason)) from exc
            changes = repo.apply_reload(plan)
            self.plane.models_changed(removed=plan.removed)
            failed = {
                key: reason
                for key, reason in repo.failures.items()
                if name is None or Path(key).parent.parent.name == name
            }
            return {**changes, "failures": failed}

    async def load_model(self, name: str) -> dict[str, Any]:
        """Load or reload every version of a model from disk (Triton's repository ``load``):
        400 when none is on disk, or when none of them loads (naming why)."""
        result = await self.reload(name)
        if not self.repository.available().get(name):
            if not self.repository.discover_or_empty().get(name):
                raise BadRequestError(f"model {name!r} has no version on disk to load")
            raise BadRequestError(
                f"model {name!r} failed to load: {'; '.join(result['failures'].values())}"
            )
        return result

    async def upload_files(self, name: str, files: Mapping[str, bytes]) -> None:
        """Upload whole files as versions (version -> bytes), each replacing its version."""
        for version, data in files.items():

            async def one(data: bytes = data) -> AsyncIterator[bytes]:
                yield data

            await self.upload(name, version, one(), overwrite=True)

    async def unload_model(self, name: str) -> dict[str, Any]:
        """Unload every version of a model (Triton's repository ``unload``)."""
        check_name(name)
        async with self._lock:
            repo = self.repository
            versions = repo.available().get(name)
            if not versions:
                raise ModelNotFoundError(name, None, repo.available())
            repo.set_default(name, None)
            removed = [self._unload(name, v) for v in versions]
            self.plane.models_changed(removed=removed)
            return {"model": name, "unloaded": versions}
