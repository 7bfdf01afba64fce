"""The /v1 REST API: models, predictions with top-k and statistics, live activation monitor."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from service.api.auth import require_api_key
from service.api.errors import error_responses
from service.api.routes import OrjsonResponse, get_plane
from service.api.v1_codec import SHAPE_HEADER, STATS_LEVELS, StatsLevel, read_predict_body
from service.core.dataplane import DataPlane
from service.runtime.loaded_model import LoadedModel, RunResult, top_k
from service.settings import ServiceSettings

router = APIRouter(prefix="/v1", responses=error_responses(404, 422, 503))
PREDICT_ERRORS = error_responses(
    400,
    413,
    415,
    422,
    descriptions={
        422: "Invalid parameters, or an input that overflows inside the model (non_finite_output)"
    },
)
Plane = Annotated[DataPlane, Depends(get_plane)]
DEFAULT_TOP_K = 5


class PredictQuery(BaseModel):
    """Query parameters of predict; the body's own ``top_k`` and ``stats`` win over them."""

    top_k: int | None = Field(None, ge=1, description="Labels per item (default 5, capped)")
    stats: StatsLevel | None = Field(
        None, description="Activation statistics: none, summary or channels"
    )
    shape: str | None = Field(None, description="Shape of a raw float32 body, e.g. 1,1,8,8")


# The body is read by hand (one route takes five content types), so it is documented here.
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "One or many images as multipart files (field `file`, repeated, or `files`), "
            'JSON `{"images": [base64, ...]}`, JSON `{"tensor": {"shape": [...], "data": '
            "base64 float32 | nested lists}}`, raw little-endian float32 as "
            f"`application/octet-stream` with the shape in `{SHAPE_HEADER}` or `?shape=`, "
            "or one raw `image/*` file. The image format is read from the bytes."
        ),
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer"},
                        "stats": {"type": "string", "enum": list(STATS_LEVELS)},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string"}},
                        "tensor": {
                            "type": "object",
                            "properties": {
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "data": {"type": "string", "description": "base64 float32"},
                            },
                        },
                        "top_k": {"type": "integer"},
                        "stats": {"type": "string", "enum": list(STATS_LEVELS)},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


@router.get("/models", tags=["models"], summary="List models, their versions and the default")
async def list_models(plane: Plane) -> OrjsonResponse:
    """Every model in the repository with its loaded versions."""
    return OrjsonResponse({"models": plane.list_models()})


@router.get("/models/{name}", tags=["models"], summary="Metadata of a model's latest version")
@router.get(
    "/models/{name}/versions/{version}",
    tags=["models"],
    summary="Metadata of one model version",
)
async def model_metadata(plane: Plane, name: str, version: str | None = None) -> OrjsonResponse:
    """Inputs, labels, preprocessing, activation layers, execution provider and fall-back."""
    return OrjsonResponse(plane.get_model(name, version).info())


@router.post(
    "/models/{name}/predict",
    tags=["predict"],
    summary="Classify images or a tensor with the latest version",
    openapi_extra=_PREDICT_BODY,
    responses=PREDICT_ERRORS,
)
async def predict(
    request: Request, name: str, query: Annotated[PredictQuery, Query()]
) -> OrjsonResponse:
    """Top-k labels per image or tensor, and per-layer statistics when asked."""
    return await _predict(request, name, None, query)


@router.post(
    "/models/{name}/versions/{version}/predict",
    tags=["predict"],
    summary="Classify images or a tensor with one model version",
    openapi_extra=_PREDICT_BODY,
    responses=PREDICT_ERRORS,
)
async def predict_version(
    request: Request, name: str, version: str, query: Annotated[PredictQuery, Query()]
) -> OrjsonResponse:
    """Top-k labels per image or tensor, and per-layer statistics when asked."""
    return await _predict(request, name, version, query)


async def _predict(
    request: Request, name: str, version: str | None, query: PredictQuery
) -> OrjsonResponse:
    plane: DataPlane = request.app.state.plane
    settings: ServiceSettings = plane.settings
    body = await read_predict_body(
        request, max_items=settings.max_batch_size, query_shape=query.shape
    )
    stats = body.stats or query.stats or "none"
    k = body.top_k or query.top_k or DEFAULT_TOP_K
    inputs = body.tensor if body.tensor is not None else body.images
    model, result = await plane.predict(name, version, inputs, stats)
    names = None if body.tensor is not None else [n for n, _ in body.images]
    return OrjsonResponse(encode_prediction(model, result, k, settings.max_top_k, stats, names))


def encode_prediction(
    model: LoadedModel,
    result: RunResult,
    k: int,
    max_top_k: int,
    stats: str,
    names: list[str] | None,
) -> dict[str, Any]:
    """The predict answer: model, provider, per-item top-k, and statistics when asked."""
    num_classes = result.probabilities.shape[1]
    labels = model.labels or [str(i) for i in range(num_classes)]
    k = max(1, min(k, max_top_k, num_classes))
    ranked = top_k(result.probabilities, k, labels)
    predictions = []
    for i, top in enumerate(ranked):
        item: dict[str, Any] = {"top_k": top}
        if names is not None:
            item["input"] = names[i]
        predictions.append(item)
    answer: dict[str, Any] = {
        "model": {"name": model.name, "version": str(model.version)},
        "provider": model.providers.used[0],
        "fell_back": model.providers.fell_back,
        "top_k": k,
        "predictions": predictions,
    }
    if stats != "none" and result.layer_stats is not None:
        answer["stats"] = {
            "level": stats,
            "samples": int(result.probabilities.shape[0]),
            "layers": result.layer_stats,  # JSON-ready; per-channel rates only for "channels"
        }
    return answer


@router.get(
    "/models/{name}/activations",
    tags=["activations"],
    summary="Live activation monitor: rolling sparsity, dead units, drift",
)
async def activations(plane: Plane, name: str) -> OrjsonResponse:
    """The model's rolling window over live traffic, per layer, with drift vs. reference."""
    return OrjsonResponse(plane.monitor_snapshot(name))


# Wiping the window hides what live traffic did to the model (dead units, drift): an
# operator's act, so it takes the management API key, and is off (403) when none is set.
@router.post(
    "/models/{name}/activations/reset",
    tags=["activations"],
    summary="Empty the live activation window (needs the management API key)",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 403),
)
async def reset_activations(plane: Plane, name: str) -> OrjsonResponse:
    """Start the model's monitor window afresh (e.g. after a deployment). Send the
    management API key as `Authorization: Bearer <key>`."""
    plane.reset_monitor(name)
    return OrjsonResponse({"model": name, "reset": True})
