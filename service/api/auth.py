"""API-key protection of the management API: ``Authorization: Bearer <key>``.

- No key configured (``RELU_SERVE_MANAGEMENT_API_KEY`` unset or empty): the management API is
  off; every call answers 403 ``management_disabled``, whatever it sends. 403 rather than 404
  so that an operator sees why at once instead of suspecting a wrong URL.
- No ``Authorization`` header, or not a bearer token: 401 with ``WWW-Authenticate: Bearer``
  (RFC 6750 section 3).
- A wrong key: 403 ``invalid_api_key``. Keys are compared with ``hmac.compare_digest``, whose
  time does not depend on where the first differing byte is, so the key cannot be guessed
  byte by byte from response times.

Failed attempts are logged with the client address, never with the token sent.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.core.errors import ServiceError

logger = logging.getLogger(__name__)

REALM = "relu-serve management"
KEY_SETTING = "RELU_SERVE_MANAGEMENT_API_KEY"

# Declares the scheme in the OpenAPI document (Swagger UI's "Authorize" button); the checks
# below are ours, so that each failure gets its own status and message.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ManagementKey",
    description=f"The management API key ({KEY_SETTING}) as a bearer token.",
)


class UnauthorizedError(ServiceError):
    """No credentials, or not a bearer token: 401 with a ``WWW-Authenticate`` challenge."""

    status_code = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    """A wrong key, or the management API is turned off: 403."""

    status_code = 403
    code = "forbidden"


def check_bearer(authorization: str | None, key: SecretStr | None) -> None:
    """Raise unless ``authorization`` (the header's value) carries ``key`` as a bearer token."""
    if key is None:
        raise ForbiddenError(
            f"the management API is disabled: set {KEY_SETTING} to enable it",
            code="management_disabled",
        )
    if not authorization:
        raise UnauthorizedError(
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError(
            "malformed Authorization header: expected 'Bearer <key>'",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_request"'},
        )
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header may hold any byte.
    if not hmac.compare_digest(
        token.encode("utf-8", "surrogateescape"), key.get_secret_value().encode("utf-8")
    ):
        raise ForbiddenError("wrong API key", code="invalid_api_key")


async def require_api_key(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """FastAPI dependency of every management route: pass with the right key, else 401/403."""
    try:
        check_bearer(
            request.headers.get("authorization"), request.app.state.settings.management_api_key
        )
    except ServiceError as exc:
        if exc.code != "management_disabled":
            client = request.client.host if request.client else "?"
            logger.warning(
                "management API: %s from %s on %s %s",
                exc.code,
                client,
                request.method,
                request.url.path,
            )
        raise
