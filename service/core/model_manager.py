"""Model management, independent of HTTP: upload, load, unload, delete, default, reload.

The repository on disk is the truth (``service.core.repository``). Every operation writes the
disk first, under the repository's cross-process lock (``repository_lock``, taken in a
thread): the model file, and the model's ``state.json`` (the pinned default, the versions
unloaded at run time). Then it syncs its own process from the disk and answers, so the
answer comes once this process serves the change. Every other worker, and every replica on
the same volume, picks the change up by polling (``poll``, every ``repository_poll_s``): the
disk's ``fingerprint`` (stats only) is compared with the last one seen, and when it differs
the repository syncs. Nobody is told over a side channel. The process that made a change
finds nothing left to do at its next poll: what it loaded is recorded with its file's stat.

Safety rules, in the order an upload meets them:

1. **Staged, never in place.** The body streams into ``<root>/.staging/upload-*/model.onnx``
   (same file system as the repository, so the final move is a rename; ``discover`` skips
   dot-folders) with a size limit, then ``fsync``. The staging folder is held by an exclusive
   ``flock`` on its lock file beside it (``upload-*.lock``) while in use; ``clean_staging``
   (at every worker's start) removes the folders nobody holds: leftovers of an interrupted
   upload, never one in progress in another worker or replica.
2. **Validated before it serves.** The staged file is loaded (ONNX check, our metadata,
   labels against the output, the input), its preprocessing is checked against the input
   shape, and it runs on zeros with and without statistics (a warm-up that must succeed):
   first in a child process with a time and a memory limit (``service.core.validation``:
   ``validation_timeout_s``, ``validation_memory_bytes``), then, once that said OK, here for
   serving. A bad file, or one over a limit, is answered 422 naming the problem (the child
   killed); the repository and what serves are as before.
3. **Installed atomically.** A new version folder is renamed into place whole
   (``os.replace``); a replaced file is renamed over the old one; then the parent folder is
   fsynced; then ``state.json`` is written the same way. A crash at any point leaves either
   the old state or the new one on disk, plus at worst a leftover in ``.staging/`` that
   nothing reads and the next start removes.
4. **Published in one step.** Only then does the repository publish a new state (one
   assignment): requests see the old version or the complete new one, never a half-loaded
   one. Replaced or unloaded versions are never closed: requests holding them finish on them.

Operations and the poller are serialized in the process by one ``asyncio.Lock``, across
processes by the repository lock; slow work (loading, fsync, waiting for the other
processes' lock) runs in worker threads, and every change of the repository's state is
published from the event loop thread, so synchronous code on the loop (a metrics scrape, a
route) never sees the table change in the middle of it. A read-only repository keeps
serving and polling; its management writes answer 507.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from service.core.dataplane import DataPlane
from service.core.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
    UnprocessableError,
)
from service.core.files import fsync_dir
from service.core.repository import (
    LATEST,
    MODEL_FILENAME,
    FileKey,
    ModelNotFoundError,
    ModelRepository,
    ModelState,
    canonical_version,
    file_key,
    repository_lock,
)
from service.core.validation import ChildValidator, ValidationLimits, ValidationRefused
from service.runtime.loaded_model import LoadedModel, ModelLoadError
from service.runtime.servable import check_servable

logger = logging.getLogger(__name__)

# Model names become folder names: no separators, no leading dot (hidden, or "..").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
VERSION_PATTERN = r"^0*[1-9][0-9]{0,8}$"
STAGING_DIR = ".staging"
LOCK_SUFFIX = ".lock"  # a staging folder's lock file: <folder>.lock beside it
T = TypeVar("T")


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


class StagingFolder:
    """A new folder in ``<root>/.staging`` that this process holds while it exists.

    Its lock file beside it (``<folder>.lock``) is created and locked (``flock``, exclusive)
    before the folder exists, and released after the folder is gone, so ``clean_staging`` in
    any process can tell a folder in use from an abandoned one by trying the lock.
    """

    def __init__(self, root: Path, prefix: str) -> None:
        staging = root / STAGING_DIR
        staging.mkdir(exist_ok=True)
        while True:
            fd, lock_path = tempfile.mkstemp(prefix=prefix, suffix=LOCK_SUFFIX, dir=staging)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A clean-up that raced us may have removed the file before we locked it: then
            # the lock guards nothing; start again with a new name.
            if _same_file(fd, Path(lock_path)):
                break
            os.close(fd)
        self._fd = fd
        self.lock_path = Path(lock_path)
        self.path = self.lock_path.with_name(self.lock_path.name.removesuffix(LOCK_SUFFIX))
        try:
            self.path.mkdir()
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Remove the folder (what is still in it), then its lock file; release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)
        os.close(self._fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def clean_staging(root: Path) -> list[str]:
    """Remove the abandoned entries of ``<root>/.staging``: each folder (or lock file alone)
    whose lock file this process can lock is held by nobody (an upload or delete that was
    interrupted: a crash, a kill) and goes; one locked by another process (a worker or a
    replica mid-upload) stays. Returns the names removed. Never raises: a read-only or
    missing folder leaves nothing to do."""
    staging = root / STAGING_DIR
    try:
        names = os.listdir(staging)
    except OSError:
        return []
    removed = []
    for base in sorted({name.removesuffix(LOCK_SUFFIX) for name in names}):
        lock_path = staging / (base + LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            logger.warning("cannot clean %s: %s", staging / base, exc)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: in use by another process
            os.close(fd)
            continue
        try:
            path = staging / base
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            os.unlink(lock_path)
            removed.append(base)
        except OSError as exc:
            logger.warning("cannot clean %s: %s", staging / base, exc)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d abandoned staging folder(s) in %s", len(removed), staging)
    return removed


class ModelManager:
    """Management operations on the data plane's repository (each returns a JSON-ready
    dict), and the poller that keeps this process on what the repository holds."""

    def __init__(
        self,
        plane: DataPlane,
        max_upload_bytes: int,
        poll_s: float = 2.0,
        *,
        validation: ValidationLimits,
    ) -> None:
        self.plane = plane
        self.max_upload_bytes = max_upload_bytes
        self.poll_s = poll_s
        self.validator = ChildValidator(validation)
        self._lock = asyncio.Lock()
        self._seen: tuple[Any, ...] | None = None  # the disk's fingerprint at the last sync
        self._poller: asyncio.Task[None] | None = None

    @property
    def repository(self) -> ModelRepository:
        """The loaded repository; 503 while models are still loading."""
        if self.plane.repository is None:
            raise ServiceUnavailableError("models are still loading; try again shortly")
        return self.plane.repository

    # ------------------------------------------------------------------ following the disk

    async def start(self) -> None:
        """Once the models are loaded: remove abandoned staging folders, start polling."""
        await anyio.to_thread.run_sync(clean_staging, self.repository.root)
        self._poller = asyncio.create_task(self._poll_forever(), name="repository-poller")

    def stop_validations(self) -> None:
        """Kill the validations in progress and refuse new ones (503): the server stops.
        Safe from a signal handler or another thread."""
        self.validator.stop()

    async def stop(self) -> None:
        """Stop polling (a sync in progress is abandoned; nothing it loaded was published)
        and validating."""
        self.stop_validations()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # a bad look at the disk must not end the polling
                logger.exception("polling the model repository %s", self.repository.root)

    async def poll(self) -> dict[str, list[str]] | None:
        """One look at the disk: when its fingerprint changed since the last sync, sync
        (every model) and return what changed; None when nothing on disk changed."""
        repo = self.repository
        async with self._lock:
            fingerprint = await anyio.to_thread.run_sync(repo.fingerprint)
            if fingerprint == self._seen:
                return None
            changes = await self._sync()
            self._seen = fingerprint  # taken before the sync: a later change shows next time
            if any(changes.values()):
                logger.info("repository changed on disk: %s", changes)
            return changes

    async def _sync(
        self,
        only: str | None = None,
        preloaded: Mapping[tuple[str, str], tuple[LoadedModel, FileKey | None]] | None = None,
    ) -> dict[str, list[str]]:
        """Make this process serve what the disk says (model ``only``, or all): load in a
        thread, publish on the event loop. Call under ``self._lock``."""
        repo = self.repository
        try:
            plan = await anyio.to_thread.run_sync(repo.plan_sync, only, preloaded)
        except ModelLoadError as exc:  # the root folder itself is gone
            raise _storage_error("read the model repository", OSError(exc.reason)) from exc
        changes = repo.apply_sync(plan)
        self.plane.models_changed(removed=plan.removed)
        return changes

    async def _write(self, action: str, work: Callable[[], T]) -> T:
        """Run ``work`` (a change of the disk) in a thread under the repository lock; 507
        when the repository cannot be written."""
        root = self.repository.root

        def locked() -> T:
            with repository_lock(root):
                return work()

        try:
            return await anyio.to_thread.run_sync(locked)
        except OSError as exc:
            raise _storage_error(action, exc) from exc

    # ------------------------------------------------------------------ reading

    def index(self) -> dict[str, Any]:
        """Every model version on disk or loaded: its state (READY, UNLOADED or
        UNAVAILABLE with the reason), and each model's default version."""
        return {"models": self.repository.index()}

    def _model_summary(self, name: str) -> dict[str, Any]:
        repo = self.repository
        versions = repo.available().get(name, [])
        return {
            "name": name,
            "versions": versions,
            "default": repo.default_version(name) if versions else None,
            "pinned": repo.pinned_versions().get(name),
        }

    def _with_default(
        self, state: ModelState, name: str, version: str, default: bool | None
    ) -> ModelState:
        """``state`` (read from disk under the repository lock) after ``version`` is added
        with ``default``: True pins it; False keeps the default the repository had serving,
        pinning it (its pin, else the highest other version not unloaded: the disk's, not
        this process's view, which another instance may have changed since its last poll);
        None changes nothing."""
        repo = self.repository
        if default:
            return replace(state, default=version)
        if default is False:
            pin = repo.pin_of(name, state)
            serving = [
                v
                for v in repo.discover_or_empty().get(name, [])
                if v != version and v not in state.unloaded
            ]
            if pin is None and serving:
                pin = max(serving, key=int)
            return state if pin is None else replace(state, default=pin)
        return state

    def _refuse_default(self, state: ModelState, name: str, version: str) -> None:
        """409 when ``version`` is the pinned default and other versions serve."""
        repo = self.repository
        others = [v for v in repo.available().get(name, []) if v != version]
        if self.repository.pin_of(name, state) == version and others:
            raise ConflictError(
                f"version {version} is the default version of model {name!r}; "
                "set another default version first",
                code="version_is_default",
            )

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
                self._check_free(repo, name, version, overwrite)  # before the slow part
                model = await self._validate(staged.path / MODEL_FILENAME, name, version)

                def install() -> tuple[bool, FileKey | None]:
                    replaced = self._check_free(repo, name, version, overwrite)  # the truth
                    self._install(repo, staged.path, name, version)
                    repo.update_model_state(
                        name,
                        lambda s: self._with_default(
                            replace(s, unloaded=s.unloaded - {version}), name, version, default
                        ),
                    )
                    return replaced, file_key(repo.version_path(name, version))

                replaced, key = await self._write("install the uploaded file", install)
                model.path = repo.version_path(name, version)  # the same bytes, now in place
                await self._sync(name, {(name, version): (model, key)})
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
            staged.close()

    @staticmethod
    def _check_free(repo: ModelRepository, name: str, version: str, overwrite: bool) -> bool:
        """409 if ``version`` exists on disk and not ``overwrite``; whether it exists."""
        exists = repo.version_path(name, version).is_file()
        if exists and not overwrite:
            raise ConflictError(
                f"model {name!r} already has version {version}; send overwrite=true "
                "to replace it, or upload another version",
                code="version_exists",
            )
        return exists

    async def _stage(self, root: Path, chunks: AsyncIterable[bytes]) -> StagingFolder:
        """Stream ``chunks`` into a new staging folder's model file, fsynced; the folder."""
        try:
            staged = StagingFolder(root, "upload-")
        except OSError as exc:
            raise _storage_error("stage an upload", exc) from exc
        size = 0
        try:
            file = open(staged.path / MODEL_FILENAME, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            staged.close()
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
            staged.close()
            raise
        return staged

    async def _validate(self, path: Path, name: str, version: str) -> LoadedModel:
        """Validate a file from a client in a child process with a time and a memory limit
        (``service.core.validation``), then load it here for serving: 422 naming the
        problem, or the limit it hit."""
        repo = self.repository

        def load() -> LoadedModel:
            model = repo.load_file(path, name, version)
            check_servable(model)  # again, on the providers that will serve it
            return model

        try:
            await self.validator.validate(path, name, version)
            return await anyio.to_thread.run_sync(load)
        except ValidationRefused as exc:
            reason = exc.reason
        except ModelLoadError as exc:
            reason = exc.reason
        except ServiceError:
            raise
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
            fsync_dir(target.parent)
        else:  # a new version: rename the whole staged folder into place
            os.replace(staged, target.parent)
            fsync_dir(model_dir)
        if created:
            fsync_dir(repo.root)

    # ------------------------------------------------------------------ load, unload

    async def load(self, name: str, version: str | int, default: bool | None = None) -> dict:
        """Load (or reload) one version from its file on disk, validated like an upload; it
        stays loaded (it leaves the state file's unloaded versions)."""
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
            key = file_key(path)  # before reading it
            model = await self._validate(path, name, version)

            def write() -> None:
                repo.update_model_state(
                    name,
                    lambda s: self._with_default(
                        replace(s, unloaded=s.unloaded - {version}), name, version, default
                    ),
                )

            await self._write("record the load", write)
            await self._sync(name, {(name, version): (model, key)})
            served = repo.get(name, version)
            return {"model": name, "version": version, "state": "READY", "sha256": served.sha256}

    async def unload(self, name: str, version: str | int) -> dict[str, Any]:
        """Stop serving one version, in every process: it is recorded as unloaded in the
        state file (its file stays; ``load`` brings it back, a restart keeps it unloaded)."""
        check_name(name)
        version = check_version(version)
        async with self._lock:
            repo = self.repository
            repo.get(name, version)  # 404 unless this process serves it

            def write() -> None:
                state = repo.model_state(name)
                self._refuse_default(state, name, version)
                repo.update_model_state(name, lambda s: replace(s, unloaded=s.unloaded | {version}))

            await self._write("record the unload", write)
            await self._sync(name)
            return {"model": name, "version": version, "state": "UNLOADED"}

    async def delete(self, name: str, version: str | int) -> dict[str, Any]:
        """Unload one version and remove its folder from disk (renamed away first, so a
        crash leaves it either whole in place or gone)."""
        check_name(name)
        version = check_version(version)
        async with self._lock:
            repo = self.repository

            def write() -> None:
                path = repo.version_path(name, version)
                on_disk = path.parent.is_dir()
                if not on_disk and version not in repo.available().get(name, []):
                    raise ModelNotFoundError(name, version, repo.discover_or_empty())
                self._refuse_default(repo.model_state(name), name, version)
                if on_disk:
                    trash = StagingFolder(repo.root, "deleted-")
                    try:
                        os.replace(path.parent, trash.path / version)
                        fsync_dir(path.parent.parent)
                    finally:
                        trash.close()
                repo.update_model_state(
                    name,
                    lambda s: ModelState(
                        default=None if s.default == version else s.default,
                        unloaded=s.unloaded - {version},
                    ),
                )

            await self._write("delete the version folder", write)
            await self._sync(name)
            return {"model": name, "version": version, "state": "DELETED"}

    async def set_default(self, name: str, version: str | int | None) -> dict[str, Any]:
        """Pin the version that serves requests naming none; None or "latest" unpins (the
        highest serves, whatever ``default_versions`` says). Kept in the state file."""
        check_name(name)
        if version is not None and str(version).strip() != LATEST:
            version = check_version(version)
        async with self._lock:
            repo = self.repository
            previous = repo.default_version(name)  # 404 for an unknown model
            pin = (
                LATEST if version is None or version == LATEST else repo.get(name, version).version
            )

            def write() -> None:
                repo.update_model_state(name, lambda s: replace(s, default=pin))

            await self._write("record the default version", write)
            await self._sync(name)
            return {**self._model_summary(name), "previous_default": previous}

    async def reload(self, name: str | None = None) -> dict[str, Any]:
        """Sync with the disk now (one model, or all), without waiting for the poller: new
        versions and changed files load, vanished and unloaded ones drop; broken files are
        reported and skipped."""
        if name is not None:
            check_name(name)
        async with self._lock:
            return await self._reload(name)

    async def _reload(self, name: str | None) -> dict[str, Any]:
        changes = await self._sync(name)
        failed = {
            key: reason
            for key, reason in self.repository.failures.items()
            if name is None or Path(key).parent.parent.name == name
        }
        return {**changes, "failures": failed}

    async def load_model(self, name: str) -> dict[str, Any]:
        """Load or reload every version of a model from disk (Triton's repository ``load``):
        none stays unloaded. 400 when none is on disk, or when none of them loads."""
        check_name(name)
        async with self._lock:
            repo = self.repository
            if not repo.discover_or_empty().get(name):
                raise BadRequestError(f"model {name!r} has no version on disk to load")

            def write() -> None:
                repo.update_model_state(name, lambda s: replace(s, unloaded=frozenset()))

            await self._write("record the load", write)
            result = await self._reload(name)
        if not self.repository.available().get(name):
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
        """Unload every version of a model (Triton's repository ``unload``), in every
        process; its run-time default is forgotten."""
        check_name(name)
        async with self._lock:
            repo = self.repository
            versions = repo.available().get(name)
            if not versions:
                raise ModelNotFoundError(name, None, repo.available())

            def write() -> None:
                every = set(versions) | set(repo.discover_or_empty().get(name, []))
                repo.update_model_state(name, lambda s: ModelState(unloaded=frozenset(every)))

            await self._write("record the unload", write)
            await self._sync(name)
            return {"model": name, "unloaded": versions}
