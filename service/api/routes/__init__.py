"""HTTP routes: thin adapters that decode a request, call the data plane, encode the answer."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from service.core.dataplane import DataPlane
from service.settings import ServiceSettings


class OrjsonResponse(Response):
    """JSON rendered by orjson, numpy arrays and scalars included."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialise ``content``; NaN and infinities become null, as JSON requires."""
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


async def get_plane(request: Request) -> DataPlane:
    """The app's data plane (a FastAPI dependency). ``async``: FastAPI runs a plain ``def``
    dependency in its thread pool, a thread hop on every request (~11% of a predict's time)."""
    plane: DataPlane = request.app.state.plane
    return plane


async def get_settings(request: Request) -> ServiceSettings:
    """The app's settings (a FastAPI dependency)."""
    settings: ServiceSettings = request.app.state.settings
    return settings
