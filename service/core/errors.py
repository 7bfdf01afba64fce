"""Typed errors that carry their HTTP status: what the core and the codecs raise on purpose.

Nothing here imports a web framework; ``service.api.errors`` turns these into JSON answers.
"""

from __future__ import annotations

from collections.abc import Mapping


class ServiceError(Exception):
    """Base of the errors the service answers on purpose: a status code, a code, a message."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class BadRequestError(ServiceError):
    """The request is malformed: a bad parameter, tensor, image or protocol field."""

    status_code = 400
    code = "bad_request"


class NotFoundError(ServiceError):
    """The model, version or output named in the request does not exist."""

    status_code = 404
    code = "not_found"


class PayloadTooLargeError(ServiceError):
    """The body, an image or a batch exceeds a configured limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    """The body's content type, or an uploaded file's format, is not one we read."""

    status_code = 415
    code = "unsupported_media_type"


class UnprocessableError(ServiceError):
    """The request is well formed but its values cannot be used."""

    status_code = 422
    code = "unprocessable"


class ServiceUnavailableError(ServiceError):
    """The service cannot answer now: not ready, shutting down, or past the time limit."""

    status_code = 503
    code = "service_unavailable"
