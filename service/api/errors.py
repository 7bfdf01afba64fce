"""The one handler map that turns errors into JSON answers, and the OpenAPI shape of them.

The core and the codecs raise ``service.core.errors``; ``create_app`` registers this map
once. Bodies are ``{"error": {"code": ..., "message": ...}}``, except under ``/v2`` where the
Open Inference Protocol requires ``{"error": "<message>"}``. A client mistake is never a
500: anything not mapped here is logged with its traceback and answered with a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.core.errors import ServiceError

logger = logging.getLogger(__name__)

V2_PREFIX = "/v2"
# The status counted for a request whose client went away before it was read (never sent).
CLIENT_CLOSED_REQUEST = 499


class ErrorDetail(BaseModel):
    """What went wrong: a stable code and a message naming the problem."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """The /v1 error body."""

    error: ErrorDetail


class V2ErrorBody(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


ERROR_DESCRIPTIONS = {
    400: "Bad request: an invalid parameter, tensor, image or body",
    401: "No API key, or not a bearer token",
    403: "Wrong API key, or the management API is disabled",
    404: "No such model or version",
    409: "Conflicts with the repository: the version exists, or is the default",
    413: "Over a limit: body size, image pixels or batch size",
    415: "Not an accepted content type or image format",
    422: "Invalid parameters",
    503: "Models are still loading, the queue is full, or the run timed out",
    507: "The model repository folder cannot be written",
}


def error_responses(
    *codes: int, v2: bool = False, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, with the body each one has (and a 401's
    ``WWW-Authenticate`` challenge, RFC 6750 section 3)."""
    text = {**ERROR_DESCRIPTIONS, **(descriptions or {})}
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": V2ErrorBody if v2 else ErrorBody, "description": text[code]}
        for code in codes
    }
    if 401 in responses:
        responses[401]["headers"] = {
            "WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}
        }
    return responses


def error_response(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The JSON error body in the shape the request's API uses (v2: the protocol's shape)."""
    body: dict[str, Any]
    if request.url.path == V2_PREFIX or request.url.path.startswith(V2_PREFIX + "/"):
        body = {"error": message}
    else:
        body = {"error": {"code": code, "message": message}}
    return Response(
        orjson.dumps(body),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers or {}),
    )


async def handle_service_error(request: Request, exc: Exception) -> Response:
    """Our typed errors: their own status and code."""
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def handle_model_not_found(request: Request, exc: Exception) -> Response:
    """The repository has no such model or version: 404."""
    return error_response(request, 404, "model_not_found", _message_of(exc))


async def handle_model_input(request: Request, exc: Exception) -> Response:
    """The model refused the tensor (dtype, rank, shape, non-finite values, empty batch): 400."""
    return error_response(request, 400, "invalid_input", _message_of(exc))


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's parameter validation: 422, naming each bad parameter and its value."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc)
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        parts.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return error_response(request, 422, "validation_error", "; ".join(parts) or "invalid request")


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route 404, wrong method 405) in our JSON shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(request, exc.status_code, code, message, exc.headers)


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client closed the connection before its request was read: not an error of the
    server's, nor an answer anyone reads. Counted as 499 (nginx's "client closed request")."""
    logger.info(
        "%s %s: the client went away before its request was read", request.method, request.url.path
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Anything else is our bug: log the traceback, answer a generic 500."""
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "internal_error", "internal server error")


def _message_of(exc: Exception) -> str:
    """The exception's message without the quotes ``KeyError``-style classes add."""
    if isinstance(exc, LookupError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]

# The handlers of our own and the framework's errors; create_app adds the model layer's
# (ModelNotFoundError -> handle_model_not_found, ModelInputError -> handle_model_input) and
# registers the map once. Starlette picks the most specific class, so order does not matter.
BASE_EXCEPTION_HANDLERS: dict[int | type[Exception], Handler] = {
    ServiceError: handle_service_error,
    RequestValidationError: handle_validation_error,
    StarletteHTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,
    Exception: handle_unexpected,
}
