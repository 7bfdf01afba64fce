"""Reading a request body once, straight from the ASGI receive channel, or as a form."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from service.core.errors import BadRequestError, PayloadTooLargeError

# Starlette's bound on one non-file form field (``max_part_size``).
MAX_FIELD_BYTES = 1024 * 1024


async def read_body(request: Request) -> bytes:
    """The whole body, from ``Request.receive`` messages. ``Request.body()`` gives the same
    bytes through an async generator (tracked by the event loop, closed by ``aclosing``):
    ~10 us more per predict on the default model here (cProfile, in-process ASGI calls).
    For routes that read their body once: a second read would wait for messages that never
    come (``Request.body()`` caches; this does not)."""
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_form(
    request: Request, *, max_files: int, files_limit: tuple[str, str], max_fields: int
) -> FormData:
    """A multipart or urlencoded form, its limits each answered as one: 413 naming the
    limit when a count or size is passed (Starlette's own answer is a 400), 400 for a
    malformed body. ``files_limit`` is the setting that bounds the files, and the error
    code of passing it."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, HTTPException) as exc:
        text = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
    if text.startswith("Too many files"):
        raise PayloadTooLargeError(
            f"more than {max_files} files in one request ({files_limit[0]})",
            code=files_limit[1],
        )
    if text.startswith("Too many fields"):
        raise PayloadTooLargeError(
            f"more than {max_fields} form fields besides files in one request",
            code="too_many_fields",
        )
    if text.startswith("Part exceeded maximum size"):
        raise PayloadTooLargeError(
            f"a form field besides files is over the limit of {MAX_FIELD_BYTES} bytes",
            code="field_too_large",
        )
    raise BadRequestError(f"malformed multipart body: {text}", code="invalid_form")
