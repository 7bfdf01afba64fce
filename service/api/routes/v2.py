"""The Open Inference Protocol (KServe v2) REST API, with Triton's binary tensor extension.

Every output of the model is served, beside ``probabilities`` and the statistics, extra named
outputs (``stats/<layer>/<statistic>``, see ``service.api.v2_models``): a request that names
none of them runs the plain session and pays nothing for them. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api.body import read_body
from service.api.errors import error_responses
from service.api.routes import OrjsonResponse, get_plane
from service.api.v2_codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    PLATFORM,
    V2Output,
    decode_infer_request,
    encode_infer_response,
    tensor_metadata,
)
from service.api.v2_models import (
    CHANNEL_ACTIVITY,
    PROBABILITIES,
    OutputSpec,
    default_outputs,
    model_configuration,
    output_catalogue,
)
from service.core.dataplane import DataPlane
from service.core.errors import BadRequestError
from service.runtime.loaded_model import RunResult

router = APIRouter(
    prefix="/v2",
    tags=["v2 (Open Inference Protocol)"],
    responses=error_responses(400, 404, 503, v2=True),
)
# Health answers are the status code alone: 200 true, 4xx false, an empty body.
EMPTY_TRUE: dict[int | str, dict[str, Any]] = {
    200: {"description": "True (empty body)", "content": {}}
}
EMPTY_BOOLEAN: dict[int | str, dict[str, Any]] = {
    **EMPTY_TRUE,
    400: {"description": "False (empty body)", "content": {}},
}
Plane = Annotated[DataPlane, Depends(get_plane)]
SERVER_NAME = "relu-serve"
# Our own extension: per-layer activation statistics as extra named outputs.
STATS_EXTENSION = "activation_statistics"
# Triton's model configuration extension: GET .../config.
CONFIG_EXTENSION = "model_configuration"
# Infer takes no parameters FastAPI validates: its 422 is the model's output alone.
INFER_422 = {422: "The model's output for a sample is not finite: its input overflows"}


def _server_version() -> str:
    try:
        return package_version("relu-serve")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "0.0.0"


@router.get("/health/live", summary="Server live", response_class=Response, responses=EMPTY_TRUE)
async def server_live() -> Response:
    """200 while the process runs (empty body, per the protocol)."""
    return Response(status_code=200)


@router.get(
    "/health/ready", summary="Server ready", response_class=Response, responses=EMPTY_BOOLEAN
)
async def server_ready(plane: Plane) -> Response:
    """200 once every model is loaded and warmed up; 400 before and during shutdown (the
    protocol: 200 means true, 4xx false, empty body)."""
    return Response(status_code=200 if plane.ready else 400)


@router.get("", summary="Server metadata")
async def server_metadata() -> OrjsonResponse:
    """Name, version and the extensions this server supports."""
    return OrjsonResponse(
        {
            "name": SERVER_NAME,
            "version": _server_version(),
            "extensions": [*EXTENSIONS, CONFIG_EXTENSION, STATS_EXTENSION],
        }
    )


@router.get(
    "/models/{name}/ready",
    summary="Model ready (latest version)",
    response_class=Response,
    responses=EMPTY_BOOLEAN,
)
@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model ready",
    response_class=Response,
    responses=EMPTY_BOOLEAN,
)
async def model_ready(plane: Plane, name: str, version: str | None = None) -> Response:
    """200 when the model version is loaded and the server ready; 404 for an unknown one."""
    plane.get_model(name, version)
    return Response(status_code=200 if plane.ready else 400)


@router.get("/models/{name}", summary="Model metadata (latest version)")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(plane: Plane, name: str, version: str | None = None) -> OrjsonResponse:
    """Inputs and outputs with datatypes and shapes (-1: variable): every output of the
    model, ``probabilities`` and the statistics outputs."""
    model = plane.get_model(name, version)
    info = model.info()
    versions: list[str] = next(
        (m["versions"] for m in plane.list_models() if m["name"] == name), []
    )
    inputs = [tensor_metadata(info["input"]["name"], "FP32", list(info["input"]["shape"]))]
    outputs = [
        tensor_metadata(out_name, spec.datatype, spec.shape)
        for out_name, spec in output_catalogue(model).items()
    ]
    return OrjsonResponse(
        {
            "name": info["name"],
            "versions": [str(v) for v in versions],
            "platform": PLATFORM,
            "inputs": inputs,
            "outputs": outputs,
        }
    )


@router.get("/models/{name}/config", summary="Model configuration (latest version)")
@router.get("/models/{name}/versions/{version}/config", summary="Model configuration")
async def model_config(plane: Plane, name: str, version: str | None = None) -> OrjsonResponse:
    """Triton's model configuration (the JSON of model_config.proto's ``ModelConfig``):
    platform, batching, inputs and outputs with ``dims`` (no batch axis when
    ``max_batch_size`` > 0), instance group, and the statistics outputs in ``parameters``."""
    model = plane.get_model(name, version)
    return OrjsonResponse(model_configuration(model, plane.settings))


@router.post(
    "/models/{name}/infer",
    summary="Inference (latest version)",
    responses=error_responses(413, 415, 422, v2=True, descriptions=INFER_422),
)
async def infer(request: Request, name: str) -> Response:
    """JSON or binary tensors in; logits, probabilities and statistics outputs out."""
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference",
    responses=error_responses(413, 415, 422, v2=True, descriptions=INFER_422),
)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """JSON or binary tensors in; logits, probabilities and statistics outputs out."""
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    plane: DataPlane = request.app.state.plane
    model = plane.get_model(name, version)
    decoded = decode_infer_request(
        await read_body(request),
        header_length=request.headers.get(HEADER_LENGTH),
        content_encoding=request.headers.get("content-encoding"),
        max_body_bytes=plane.settings.max_body_bytes,
    )
    input_name = model.input_name
    if len(decoded.inputs) != 1 or decoded.inputs[0].name != input_name:
        given = [i.name for i in decoded.inputs]
        raise BadRequestError(
            f"model {model.name!r} takes exactly one input named {input_name!r}, got {given}"
        )
    catalogue = output_catalogue(model)
    output_name = model.output_name
    requested = decoded.outputs or [V2Output(n) for n in default_outputs(model)]
    for output in requested:
        if output.name not in catalogue and output.name != "logits":
            raise BadRequestError(
                f"model {model.name!r} has no output {output.name!r}; outputs are "
                f"{', '.join(catalogue)}"
            )
    names = [o.name for o in requested]
    asked = [catalogue[n].statistic for n in names if n in catalogue]
    stats = "none"
    if any(asked):
        stats = "channels" if CHANNEL_ACTIVITY in asked else "summary"
    result = await plane.infer(model, decoded.inputs[0].array, stats)
    arrays = build_outputs(result, names, output_name, catalogue)
    body, headers = encode_infer_response(
        model_name=model.name,
        model_version=str(model.version),
        request_id=decoded.id,
        outputs=[
            (o.name, arrays[o.name], decoded.binary_data_output if o.binary is None else o.binary)
            for o in requested
        ],
    )
    return Response(body, headers=headers)


def build_outputs(
    result: RunResult, names: list[str], output_name: str, catalogue: Mapping[str, OutputSpec]
) -> dict[str, np.ndarray]:
    """The arrays of the requested outputs from one run's result."""
    by_layer: dict[str, Mapping[str, Any]] = {
        layer["name"]: layer for layer in (result.layer_stats or [])
    }
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        if name == output_name:
            arrays[name] = np.asarray(result.logits)
        elif name in result.outputs:  # another output of the model
            arrays[name] = np.asarray(result.outputs[name])
        elif name == "logits":  # the classifier's output under its usual name
            arrays[name] = np.asarray(result.logits)
        elif name == PROBABILITIES:
            arrays[name] = np.asarray(result.probabilities, dtype=np.float32)
        else:
            spec = catalogue[name]
            layer = str(spec.layer)
            if spec.statistic == CHANNEL_ACTIVITY:
                per_sample = (result.per_sample_active or {})[layer]
                arrays[name] = np.asarray(per_sample, dtype=np.float32)
            elif spec.statistic == "dead_units":
                arrays[name] = np.asarray([by_layer[layer]["dead_units"]], dtype=np.int32)
            else:
                value = by_layer[layer][str(spec.statistic)]
                arrays[name] = np.asarray([np.nan if value is None else value], dtype=np.float32)
    return arrays
