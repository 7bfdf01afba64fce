"""The app factory: wires settings, the data plane, routers, middleware and error handlers."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware import Middleware

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig

from service.api.errors import BASE_EXCEPTION_HANDLERS, handle_model_input, handle_model_not_found
from service.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.api.routes import docs, health, management, metrics, ui, v1, v2
from service.core.budget import MemoryBudget
from service.core.dataplane import DataPlane
from service.core.images import configure_pillow
from service.core.metrics import ServiceMetrics
from service.core.model_manager import ModelManager
from service.core.repository import ModelNotFoundError
from service.core.validation import ValidationLimits
from service.runtime.loaded_model import ModelInputError
from service.server.dispatch import (
    Arguments,
    DirectRoutes,
    ServiceApp,
    no_arguments,
    query_model,
)
from service.server.logs import configure_logging
from service.server.shutdown import GracefulShutdown
from service.settings import ServiceSettings, load_settings

TAGS = [
    {"name": "models", "description": "Models in the repository and their metadata."},
    {"name": "predict", "description": "Top-k labels from images or tensors, with statistics."},
    {"name": "activations", "description": "Live activation monitor: sparsity, dead units."},
    {"name": "v2 (Open Inference Protocol)", "description": "KServe v2 / Triton-compatible."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "metrics", "description": "Prometheus metrics."},
]

GC_YOUNG_THRESHOLD = 20_000
# The routes that carry the traffic, and how each reads its endpoint's arguments, for the
# direct dispatch (service.server.dispatch, RELU_SERVE_DIRECT_DISPATCH).
PREDICT_QUERY = query_model("query", v1.PredictQuery)
DIRECT_ENDPOINTS: dict[Callable[..., Any], Arguments] = {
    v1.predict: PREDICT_QUERY,
    v1.predict_version: PREDICT_QUERY,
    v2.infer: no_arguments,
    v2.infer_version: no_arguments,
}
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the app; settings default to the ``RELU_SERVE_`` environment. Models load in
    the lifespan, not here."""
    settings = settings or load_settings()
    service_metrics = ServiceMetrics()
    plane = DataPlane(settings, service_metrics)
    limits = ValidationLimits(settings.validation_timeout_s, settings.validation_memory_bytes)
    manager = ModelManager(
        plane, settings.max_upload_bytes, settings.repository_poll_s, validation=limits
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        configure_pillow(settings.max_image_pixels)
        await plane.start()
        await manager.start()  # clean staging leftovers, then follow the repository on disk
        # Everything loaded so far lives as long as the process: move it out of the
        # collector's reach, so full collections under load walk only per-request objects
        # (they took ~19% of the event loop's time serving the default model, py-spy).
        gc.collect()
        gc.freeze()
        # A young-generation collection walks every live young object; under load most are
        # the in-flight requests', so collecting every 700 allocations (the default) walks
        # them again and again.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        shutdown = GracefulShutdown(
            plane, settings.shutdown_delay_s, on_stop=manager.stop_validations
        )
        shutdown.install()  # SIGTERM: readiness 503 first, then uvicorn drains
        try:
            yield
        finally:
            shutdown.uninstall()
            await manager.stop()
            await plane.stop()

    # Outermost first: metrics see every answer, the 413 of the body limit included.
    upload_limit = (settings.max_upload_bytes, "max_upload_bytes")  # model files
    middleware = [
        Middleware(MetricsMiddleware, metrics=service_metrics, known_models=plane.model_names),
        Middleware(
            BodyLimitMiddleware,
            max_body_bytes=settings.max_body_bytes,
            path_limits={"/v1/admin/": upload_limit, "/v2/repository/": upload_limit},
            budget=MemoryBudget(
                settings.body_budget_bytes, "body_budget_bytes", settings.request_deadline_s
            ),
        ),
    ]
    app = ServiceApp(
        title="relu-serve",
        summary="Image classifiers with per-layer activation statistics.",
        lifespan=lifespan,
        telemetry=None if settings.opentelemetry else TELEMETRY_OFF,
        openapi_tags=TAGS,
        docs_url=None,  # FastAPI's pages load from a CDN: service/api/routes/docs.py instead
        redoc_url=None,
        middleware=middleware,
        exception_handlers={
            **BASE_EXCEPTION_HANDLERS,
            ModelNotFoundError: handle_model_not_found,
            ModelInputError: handle_model_input,
        },
    )
    app.state.settings = settings
    app.state.plane = plane
    app.state.manager = manager
    app.state.metrics = service_metrics
    if settings.direct_dispatch:  # predict and infer skip FastAPI's machinery, not ours
        routes = (*v1.router.routes, *v2.router.routes)
        app.direct = DirectRoutes(routes, DIRECT_ENDPOINTS, app.exception_handlers, middleware)
    for router in (health.router, v1.router, v2.router, metrics.router, ui.router, docs.router):
        app.include_router(router)
    app.include_router(management.router)  # model management, behind the API key
    app.include_router(management.v2_router)
    return app
