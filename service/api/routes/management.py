"""The model management API: thin routes over ``service.core.model_manager.ModelManager``.

``/v1/admin/...`` is ours; ``/v2/repository/...`` is Triton's model repository extension
(index, load, unload; a load may carry the model file as Triton's ``file:<version>/model.onnx``
parameter), so ``tritonclient`` works. Every route needs the management API key
(``service.api.auth``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from service.api.auth import require_api_key
from service.api.body import read_form
from service.api.errors import error_responses
from service.api.routes import OrjsonResponse
from service.core.errors import BadRequestError, UnsupportedMediaTypeError
from service.core.model_manager import NAME_PATTERN, VERSION_PATTERN, ModelManager

CHUNK_BYTES = 1 << 20
RAW_TYPES = ("application/octet-stream", "application/onnx", "application/x-onnx")


# ---------------------------------------------------------------------- schemas


class VersionEntry(BaseModel):
    """One version in the repository index."""

    version: str
    on_disk: bool
    state: Literal["READY", "UNLOADED", "UNAVAILABLE"]
    sha256: str | None = None
    reason: str | None = None


class ModelEntry(BaseModel):
    """One model in the repository index; ``default`` serves requests naming no version."""

    name: str
    default: str | None
    pinned: str | None
    versions: list[VersionEntry]


class RepositoryIndex(BaseModel):
    """Every model version on disk or loaded."""

    models: list[ModelEntry]


class VersionState(BaseModel):
    """A version after a management operation."""

    model: str
    version: str
    state: Literal["READY", "UNLOADED", "DELETED"]
    sha256: str | None = None
    replaced: bool | None = None
    default: str | None = None


class ModelDefault(BaseModel):
    """A model's loaded versions and the one that serves by default."""

    name: str
    versions: list[str]
    default: str | None
    pinned: str | None
    previous_default: str | None


class ReloadResult(BaseModel):
    """What a reload changed (``name/version`` entries) and why files failed."""

    loaded: list[str]
    unloaded: list[str]
    failed: list[str]
    failures: dict[str, str]


class DefaultRequest(BaseModel):
    """The version to serve requests naming none; null or "latest": the highest."""

    version: Annotated[int, Field(ge=1, le=999_999_999)] | Literal["latest"] | None


class V2IndexRequest(BaseModel):
    """Triton's index request: ``ready`` lists only versions ready for inference."""

    ready: bool = False


class V2IndexEntry(BaseModel):
    """Triton's index entry."""

    name: str
    version: str
    state: str
    reason: str


def _errors(*codes: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    return error_responses(
        *codes,
        v2=v2,
        descriptions={
            400: "Bad request: an invalid name, version, parameter or body",
            413: "The upload is over max_upload_bytes",
            422: "Invalid parameters, or a model file that cannot serve (the message says why)",
            503: "Models are still loading",
        },
    )


COMMON = (401, 403, 422, 503)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The ONNX file: the raw bytes (`application/octet-stream`), or a multipart form "
            "with the file in field `file`."
        ),
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}

router = APIRouter(
    prefix="/v1/admin",
    tags=["management"],
    dependencies=[Depends(require_api_key)],
    responses=_errors(*COMMON),
)
v2_router = APIRouter(
    prefix="/v2/repository",
    tags=["v2 repository (Triton extension)"],
    dependencies=[Depends(require_api_key)],
    responses=_errors(*COMMON, v2=True),
)

ModelName = Annotated[str, Path(pattern=NAME_PATTERN, description="Model name (folder name)")]
Version = Annotated[str, Path(pattern=VERSION_PATTERN, description="Version, a positive integer")]
MakeDefault = Annotated[
    bool | None,
    Query(
        description="true: serve this version by default; false: keep the current default; "
        "unset: the highest version serves unless a default is pinned"
    ),
]


def get_manager(request: Request) -> ModelManager:
    """The app's model manager (a FastAPI dependency)."""
    manager: ModelManager = request.app.state.manager
    return manager


Manager = Annotated[ModelManager, Depends(get_manager)]


async def _chunks_of(upload: UploadFile, form: Any) -> AsyncIterator[bytes]:
    try:
        while chunk := await upload.read(CHUNK_BYTES):
            yield chunk
    finally:
        await form.close()


async def read_upload(request: Request) -> AsyncIterator[bytes]:
    """The uploaded file's bytes as chunks: a raw body streamed as it arrives, or the
    ``file`` field of a multipart form; 415 for other content types."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in RAW_TYPES or media == "":
        return request.stream()
    if media == "multipart/form-data":
        one_file = ("an upload carries one model file", "too_many_files")
        form = await read_form(request, max_files=1, files_limit=one_file, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            await form.close()
            raise BadRequestError(
                "multipart upload without a file in field 'file'", code="missing_file"
            )
        return _chunks_of(upload, form)
    raise UnsupportedMediaTypeError(
        f"cannot read a model file from content type {media!r}; send the raw bytes as "
        "application/octet-stream or a multipart form with field 'file'"
    )


# ---------------------------------------------------------------------- /v1/admin


@router.get(
    "/repository",
    summary="Repository index: every model version on disk or loaded, and its state",
    response_model=RepositoryIndex,
)
async def repository_index(manager: Manager) -> OrjsonResponse:
    """READY (serving), UNLOADED (on disk only) or UNAVAILABLE (failed, with the reason)."""
    return OrjsonResponse(manager.index())


@router.post(
    "/repository/reload",
    summary="Reload from disk: load new and changed files, unload vanished ones",
    response_model=ReloadResult,
    responses=_errors(507),
)
async def reload_repository(manager: Manager) -> OrjsonResponse:
    """Unchanged versions keep serving untouched; a broken file is skipped and reported."""
    return OrjsonResponse(await manager.reload())


@router.put(
    "/models/{name}/versions/{version}",
    summary="Upload a model file as this version: validated and warmed up before it serves",
    status_code=201,
    response_model=VersionState,
    openapi_extra=UPLOAD_BODY,
    responses={
        200: {"model": VersionState, "description": "Replaced"},
        **_errors(400, 409, 413, 415, 507),
    },
)
async def upload_version(
    request: Request,
    manager: Manager,
    name: ModelName,
    version: Version,
    overwrite: Annotated[bool, Query(description="Replace an existing version")] = False,
    default: MakeDefault = None,
) -> OrjsonResponse:
    """201 when added, 200 when replaced; 422 naming the problem for a file that cannot
    serve, and then nothing changed."""
    chunks = await read_upload(request)
    result = await manager.upload(name, version, chunks, overwrite=overwrite, default=default)
    return OrjsonResponse(result, status_code=200 if result["replaced"] else 201)


@router.post(
    "/models/{name}/versions",
    summary="Upload a model file as the next version",
    status_code=201,
    response_model=VersionState,
    openapi_extra=UPLOAD_BODY,
    responses=_errors(400, 413, 415, 507),
)
async def upload_next_version(
    request: Request, manager: Manager, name: ModelName, default: MakeDefault = None
) -> OrjsonResponse:
    """The new version is one more than the highest on disk or loaded."""
    chunks = await read_upload(request)
    return OrjsonResponse(
        await manager.upload(name, None, chunks, default=default), status_code=201
    )


@router.post(
    "/models/{name}/versions/{version}/load",
    summary="Load (or reload) a version from its file on disk",
    response_model=VersionState,
    responses=_errors(400, 404),
)
async def load_version(
    manager: Manager, name: ModelName, version: Version, default: MakeDefault = None
) -> OrjsonResponse:
    """Validated like an upload; a file that cannot serve gets 422 and changes nothing."""
    return OrjsonResponse(await manager.load(name, version, default=default))


@router.post(
    "/models/{name}/versions/{version}/unload",
    summary="Stop serving a version (its file stays)",
    response_model=VersionState,
    responses=_errors(400, 404, 409),
)
async def unload_version(manager: Manager, name: ModelName, version: Version) -> OrjsonResponse:
    """Requests already running on it finish; 409 for the pinned default version."""
    return OrjsonResponse(await manager.unload(name, version))


@router.delete(
    "/models/{name}/versions/{version}",
    summary="Unload a version and delete its files",
    response_model=VersionState,
    responses=_errors(400, 404, 409, 507),
)
async def delete_version(manager: Manager, name: ModelName, version: Version) -> OrjsonResponse:
    """409 for the pinned default version: set another default first."""
    return OrjsonResponse(await manager.delete(name, version))


@router.put(
    "/models/{name}/default",
    summary="Set the version that serves requests naming none",
    response_model=ModelDefault,
    responses=_errors(400, 404),
)
async def set_default_version(
    manager: Manager, name: ModelName, body: DefaultRequest
) -> OrjsonResponse:
    """``{"version": 3}`` pins version 3; ``{"version": null}`` unpins: the highest serves."""
    version = None if body.version is None else str(body.version)
    return OrjsonResponse(await manager.set_default(name, version))


# ---------------------------------------------------------------------- /v2/repository


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadRequestError("the body must be a JSON object")
    return value


@v2_router.post(
    "/index",
    summary="Repository index (Triton)",
    response_model=list[V2IndexEntry],
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": V2IndexRequest.model_json_schema()}},
        }
    },
    responses=_errors(400, v2=True),
)
async def v2_index(request: Request, manager: Manager) -> OrjsonResponse:
    """One entry per model version: name, version, state, reason."""
    body = await _json_object(request)
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequestError("'ready' must be true or false")
    entries = [
        {
            "name": model["name"],
            "version": entry["version"],
            "state": entry["state"],
            "reason": entry.get("reason") or "",
        }
        for model in manager.index()["models"]
        for entry in model["versions"]
        if not ready_only or entry["state"] == "READY"
    ]
    return OrjsonResponse(entries)


@v2_router.post(
    "/models/{name}/load",
    summary="Load or reload a model's versions from disk, or from files in the request (Triton)",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"parameters": {"type": "object"}},
                    }
                }
            },
        }
    },
    responses=_errors(400, 404, 409, 413, 507, v2=True),
)
async def v2_load(request: Request, manager: Manager, name: ModelName) -> OrjsonResponse:
    """Without parameters: every version of the model on disk loads (changed files reload,
    vanished versions unload). ``parameters`` may carry ``file:<version>/model.onnx`` (base64,
    as tritonclient's ``load_model(files=...)`` sends it): each is uploaded (replacing that
    version) and validated first."""
    body = await _json_object(request)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequestError("'parameters' must be a JSON object")
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            raise BadRequestError("a 'config' parameter is not supported: models need none")
        if not key.startswith("file:"):
            continue
        path = key.removeprefix("file:")
        version, _, filename = path.partition("/")
        if filename != "model.onnx" or not version:
            raise BadRequestError(f"file parameter {key!r}: expected 'file:<version>/model.onnx'")
        if not isinstance(value, str):
            raise BadRequestError(f"file parameter {key!r} must be a base64 string")
        try:
            files[version] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError(f"file parameter {key!r} is not valid base64") from None
    if files:
        await manager.upload_files(name, files)
    else:
        await manager.load_model(name)
    return OrjsonResponse({})


@v2_router.post(
    "/models/{name}/unload",
    summary="Unload every version of a model (Triton)",
    responses=_errors(400, 404, v2=True),
)
async def v2_unload(request: Request, manager: Manager, name: ModelName) -> OrjsonResponse:
    """The files stay; a later load brings them back."""
    await _json_object(request)
    await manager.unload_model(name)
    return OrjsonResponse({})
