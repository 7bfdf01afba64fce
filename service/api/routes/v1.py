"""The /v1 REST API: models, predictions with top-k and statistics, live activation monitor."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError

from service.api.errors import error_responses
from service.api.routes import OrjsonResponse, get_plane
from service.api.v1_codec import SHAPE_HEADER, STATS_LEVELS, read_predict_body
from service.core.dataplane import DataPlane
from service.runtime.loaded_model import LoadedModel, RunResult, top_k
from service.settings import ServiceSettings

router = APIRouter(prefix="/v1", responses=error_responses(404, 422, 503))
PREDICT_ERRORS = error_responses(400, 413, 415)
Plane = Annotated[DataPlane, Depends(get_plane)]
DEFAULT_TOP_K = 5

# The query parameters are read by hand (``_query_options``) and documented here: FastAPI's
# parameter machinery cost ~20% of the event loop's time per predict under load (py-spy).
_PREDICT_BODY = {
    "parameters": [
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": "Labels per item (default 5, capped)",
            "schema": {"type": "integer", "minimum": 1},
        },
        {
            "name": "stats",
            "in": "query",
            "required": False,
            "description": "Activation statistics: none, summary or channels",
            "schema": {"type": "string", "enum": list(STATS_LEVELS)},
        },
        {
            "name": "shape",
            "in": "query",
            "required": False,
            "description": "Shape of a raw float32 body, e.g. 1,1,8,8",
            "schema": {"type": "string"},
        },
    ],
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
                        "stats": {"type": "string", "enum": ["none", "summary", "channels"]},
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
                        "stats": {"type": "string", "enum": ["none", "summary", "channels"]},
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
@router.post(
    "/models/{name}/versions/{version}/predict",
    tags=["predict"],
    summary="Classify images or a tensor with one model version",
    openapi_extra=_PREDICT_BODY,
    responses=PREDICT_ERRORS,
)
async def predict(request: Request) -> OrjsonResponse:
    """Top-k labels per image or tensor, and per-layer statistics when asked."""
    plane: DataPlane = request.app.state.plane
    params = request.path_params
    model = plane.get_model(params["name"], params.get("version"))
    settings: ServiceSettings = plane.settings
    top_k_param, stats_param, shape = _query_options(request)
    body = await read_predict_body(request, max_items=settings.max_batch_size, query_shape=shape)
    stats = body.stats or stats_param or "none"
    k = body.top_k or top_k_param or DEFAULT_TOP_K
    if body.tensor is not None:
        x = body.tensor
        names = None
    else:
        x = await plane.images_to_tensor(model, body.images)
        names = [n for n, _ in body.images]
    result = await plane.infer(model, x, stats)
    return OrjsonResponse(encode_prediction(model, result, k, settings.max_top_k, stats, names))


def _query_options(request: Request) -> tuple[int | None, str | None, str | None]:
    """``top_k``, ``stats`` and ``shape`` from the query; 422 like FastAPI's own checks."""
    if not request.scope["query_string"]:
        return None, None, None
    query = request.query_params
    errors = []
    top_k_text = query.get("top_k")
    top_k_value = None
    if top_k_text is not None:
        try:
            top_k_value = int(top_k_text)
        except ValueError:
            errors.append(_query_error("top_k", "Input should be a valid integer", top_k_text))
        else:
            if top_k_value < 1:
                errors.append(_query_error("top_k", "Input should be at least 1", top_k_text))
    stats = query.get("stats")
    if stats is not None and stats not in STATS_LEVELS:
        errors.append(
            _query_error("stats", f"Input should be one of {', '.join(STATS_LEVELS)}", stats)
        )
    if errors:
        raise RequestValidationError(errors)
    return top_k_value, stats, query.get("shape")


def _query_error(name: str, message: str, value: str) -> dict[str, Any]:
    return {"loc": ("query", name), "msg": message, "input": value, "type": "value_error"}


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


@router.post(
    "/models/{name}/activations/reset",
    tags=["activations"],
    summary="Empty the live activation window",
)
async def reset_activations(plane: Plane, name: str) -> OrjsonResponse:
    """Start the model's monitor window afresh (e.g. after a deployment)."""
    plane.reset_monitor(name)
    return OrjsonResponse({"model": name, "reset": True})
