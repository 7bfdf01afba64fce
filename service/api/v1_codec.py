"""The /v1 predict body: what a client may send, decoded into images or one tensor.

Accepted bodies (the content type decides, the format of an image is sniffed from its bytes):

- ``multipart/form-data``: files in the field ``file`` (repeated) or ``files``; optional form
  fields ``top_k`` and ``stats``.
- ``application/json``: ``{"images": ["<base64>", ...]}`` (data URLs accepted) or
  ``{"tensor": {"shape": [...], "data": "<base64 of little-endian float32>" | nested lists}}``;
  optional ``top_k`` and ``stats``.
- ``application/octet-stream``: raw little-endian float32, shape in the ``X-Tensor-Shape``
  header or the ``shape`` query parameter (``1,1,8,8``).
- ``image/*``: one raw image file.

Query parameters ``top_k`` and ``stats`` apply when the body does not set them.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.body import read_body, read_form
from service.api.shapes import check_shape, elements, shown
from service.core.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

StatsLevel = Literal["none", "summary", "channels"]
STATS_LEVELS: tuple[str, ...] = get_args(StatsLevel)
FILE_FIELDS = ("file", "files")
SHAPE_HEADER = "X-Tensor-Shape"
ACCEPTED_TYPES = (
    "multipart/form-data, application/json, application/octet-stream (raw float32) or image/*"
)


@dataclass
class PredictBody:
    """A decoded predict request: images (name, bytes) or a tensor, and its options."""

    images: list[tuple[str, bytes]] = field(default_factory=list)
    tensor: np.ndarray | None = None
    top_k: int | None = None
    stats: StatsLevel | None = None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_predict_body(
    request: Request, *, max_items: int, query_shape: str | None = None
) -> PredictBody:
    """Decode the body per its content type; 415 for a type we do not read."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, max_items)
    if media_type == "application/json" or media_type.endswith("+json"):
        return _read_json(await read_body(request), max_items)
    if media_type == "application/octet-stream":
        shape = request.headers.get(SHAPE_HEADER) or query_shape
        return PredictBody(tensor=decode_raw_tensor(await read_body(request), shape))
    if media_type.startswith("image/"):
        return PredictBody(images=[("body", await read_body(request))])
    shown = media_type or "none"
    raise UnsupportedMediaTypeError(
        f"content type {shown!r} is not accepted for predict; send {ACCEPTED_TYPES}"
    )


async def _read_multipart(request: Request, max_items: int) -> PredictBody:
    form = await read_form(
        request,
        max_files=max_items,
        files_limit=("max_batch_size", "batch_too_large"),
        max_fields=16,
    )
    try:
        uploads = [
            item
            for key in FILE_FIELDS
            for item in form.getlist(key)
            if isinstance(item, UploadFile)
        ]
        if not uploads:
            fields = sorted(set(form.keys()))
            raise BadRequestError(
                f"multipart body has no image file: send it in a field named 'file' (repeat it "
                f"for several) or 'files'; the form has fields {fields}"
            )
        images = [(u.filename or f"file {i}", await u.read()) for i, u in enumerate(uploads)]
        top_k = form.get("top_k")
        stats = form.get("stats")
        return PredictBody(
            images=images,
            top_k=_parse_top_k(top_k) if isinstance(top_k, str) else None,
            stats=_parse_stats(stats) if isinstance(stats, str) else None,
        )
    finally:
        await form.close()


def _read_json(raw: bytes, max_items: int) -> PredictBody:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError('JSON body must be an object with "images" or "tensor"')
    top_k = _parse_top_k(body["top_k"]) if body.get("top_k") is not None else None
    stats = _parse_stats(body["stats"]) if body.get("stats") is not None else None
    has_images, has_tensor = "images" in body, "tensor" in body
    if has_images == has_tensor:
        raise BadRequestError(
            'JSON body needs exactly one of "images" (a list of base64 strings) or "tensor" '
            '({"shape": [...], "data": ...})'
        )
    if has_tensor:
        return PredictBody(tensor=decode_json_tensor(body["tensor"]), top_k=top_k, stats=stats)
    images = body["images"]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequestError('"images" must be a list of base64-encoded image files')
    if len(images) > max_items:
        raise PayloadTooLargeError(
            f"{len(images)} images in one request, over the limit of {max_items} (max_batch_size)",
            code="batch_too_large",
        )
    return PredictBody(
        images=[(f"images[{i}]", _b64decode(s, f"images[{i}]")) for i, s in enumerate(images)],
        top_k=top_k,
        stats=stats,
    )


def _b64decode(text: str, what: str) -> bytes:
    """Standard or URL-safe base64, with or without padding or a ``data:...;base64,`` prefix."""
    try:  # the common case first: plain padded standard base64, no string copies
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = text.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{what} is not valid base64") from None


def _parse_shape(shape: Any, what: str) -> tuple[int, ...]:
    if isinstance(shape, str):
        try:
            shape = [int(part) for part in shape.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            raise BadRequestError(
                f"{what} must be comma-separated integers like 1,1,8,8, got {shown(shape)}"
            ) from None
    if shape == []:
        raise BadRequestError(f"{what} must not be empty")
    return check_shape(shape, what)


def decode_raw_tensor(raw: bytes, shape_text: str | None) -> np.ndarray:
    """Raw little-endian float32 bytes plus a shape -> the tensor."""
    if shape_text is None:
        raise BadRequestError(
            f"a raw float32 body needs its shape in the {SHAPE_HEADER} header or the "
            "'shape' query parameter, e.g. 1,1,8,8"
        )
    return _from_bytes(raw, _shape_from_text(shape_text), "body")


def _shape_from_text(text: str) -> tuple[int, ...]:
    """``_parse_shape`` of a header or query value; the few short shapes clients repeat are
    cached (a cache keyed by longer client text would keep what clients send)."""
    if len(text) <= _CACHED_SHAPE_CHARS:
        return _short_shape(text)
    return _parse_shape(text, "shape")


_CACHED_SHAPE_CHARS = 64


@functools.lru_cache(maxsize=256)  # at most 256 texts of 64 characters
def _short_shape(text: str) -> tuple[int, ...]:
    return _parse_shape(text, "shape")


def _from_bytes(raw: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    count = elements(shape)
    if len(raw) != 4 * count:
        raise BadRequestError(
            f"{what} has {len(raw)} bytes, but shape {list(shape)} of float32 needs {4 * count}"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32, copy=False)


def decode_json_tensor(tensor: Any) -> np.ndarray:
    """``{"shape": [...], "data": base64 | nested lists, "dtype": "float32"?}`` -> the tensor."""
    if isinstance(tensor, list):  # the nested lists themselves: say where they go
        raise BadRequestError(
            '"tensor" must be an object, got a list: put nested lists in its "data", as '
            '{"tensor": {"shape": [...], "data": [[...]]}} (the shape may then be left out)'
        )
    if not isinstance(tensor, dict):
        raise BadRequestError(
            '"tensor" must be an object {"shape": [...], "data": base64 | [[...]]}, got '
            f"{type(tensor).__name__}"
        )
    dtype = tensor.get("dtype", "float32")
    if dtype not in ("float32", "FP32", "<f4"):
        raise BadRequestError(
            f'tensor dtype {dtype!r} is not supported; send float32 (the only "dtype" accepted)'
        )
    if "data" not in tensor:
        raise BadRequestError('"tensor" needs "data": base64 of float32 bytes or nested lists')
    data = tensor["data"]
    shape = tensor.get("shape")
    if isinstance(data, str):
        if shape is None:
            raise BadRequestError('"tensor" with base64 "data" needs a "shape"')
        parsed = _parse_shape(shape, "tensor shape")
        return _from_bytes(_b64decode(data, "tensor data"), parsed, "tensor data")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(
            f"tensor data must be base64 or nested lists of numbers of one shape: {exc}"
        ) from None
    if shape is not None:
        parsed = _parse_shape(shape, "tensor shape")
        if array.size != elements(parsed):
            raise BadRequestError(
                f"tensor data has {array.size} numbers, shape {list(parsed)} needs "
                f"{elements(parsed)}"
            )
        array = array.reshape(parsed)
    return array


def _parse_top_k(value: Any) -> int:
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"top_k must be a positive integer, got {value!r}") from None
    if top_k < 1 or isinstance(value, bool) or (isinstance(value, float) and value != top_k):
        raise BadRequestError(f"top_k must be a positive integer, got {value!r}")
    return top_k


def _parse_stats(value: Any) -> StatsLevel:
    if value not in STATS_LEVELS:
        raise BadRequestError(f"stats must be one of {', '.join(STATS_LEVELS)}, got {value!r}")
    return value  # type: ignore[no-any-return]
