"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.core.metrics import CONTENT_TYPE, ServiceMetrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format 0.0.4)",
    response_class=Response,
    responses={200: {"description": "The exposition", "content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    """Request counts and latencies, inference times, providers, activation monitors: of
    every worker process when there are several (prometheus_client's multiprocess mode)."""
    registry: ServiceMetrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
