"""Liveness and readiness for Kubernetes probes and the Dockerfile's HEALTHCHECK."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.errors import error_responses
from service.api.routes import OrjsonResponse, get_plane
from service.core.dataplane import DataPlane
from service.core.errors import ServiceUnavailableError

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="Liveness: 200 while the process runs")
async def live() -> OrjsonResponse:
    """Always 200 while the event loop answers."""
    return OrjsonResponse({"status": "live"})


@router.get(
    "/ready",
    summary="Readiness: 200 once every model is loaded and warmed up",
    responses=error_responses(503, descriptions={503: "Still loading, or shutting down"}),
)
async def ready(plane: Annotated[DataPlane, Depends(get_plane)]) -> OrjsonResponse:
    """503 until the lifespan has loaded and warmed up every model, and again on shutdown."""
    if not plane.ready:
        raise ServiceUnavailableError(
            "not ready: models are loading or the service is shutting down", code="not_ready"
        )
    return OrjsonResponse({"status": "ready", "models": len(plane.list_models())})
