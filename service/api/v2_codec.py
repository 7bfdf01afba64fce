"""Open Inference Protocol (KServe v2) REST bodies, with Triton's binary tensor extension.

Decoding: the JSON inference request, optionally followed by raw little-endian tensor bytes
(``Inference-Header-Content-Length`` gives the JSON's length; each binary input carries
``parameters.binary_data_size``), optionally gzip/deflate-compressed as tritonclient sends it.
Encoding: JSON outputs, or binary ones after the JSON when ``parameters.binary_data`` (per
output) or ``binary_data_output`` (per request) asks for them.

Specs: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md and
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
Nothing here knows about HTTP frameworks or models: bytes and numpy in, bytes and numpy out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.api.shapes import check_shape, elements
from service.core.errors import BadRequestError, PayloadTooLargeError

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"

# Datatypes we can send back (a model's extra outputs may have any of them); inputs must be
# FP32 (the models are float32 classifiers).
NP_TO_V2 = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float64): "FP64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.bool_): "BOOL",
}
INPUT_DATATYPES = ("FP32",)


@dataclass
class V2Input:
    """One decoded input tensor."""

    name: str
    datatype: str
    array: np.ndarray


@dataclass
class V2Output:
    """One output the client asked for; ``binary`` None means 'the request's default'."""

    name: str
    binary: bool | None = None


@dataclass
class V2Request:
    """A decoded inference request."""

    inputs: list[V2Input]
    outputs: list[V2Output] | None  # None: the client named none, send the defaults
    id: str | None = None
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, refusing to inflate past ``limit`` bytes."""
    if not encoding or encoding.lower() == "identity":
        return body
    kind = encoding.lower()
    if kind not in ("gzip", "deflate"):
        raise BadRequestError(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    # wbits: 16+MAX_WBITS reads a gzip wrapper, MAX_WBITS a zlib one (HTTP "deflate").
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"body is not valid {kind} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(
            f"decompressed body is over the limit of {limit} bytes (max_body_bytes)"
        )
    return out


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise BadRequestError(f"{what} must be a boolean, got {value!r}")


def decode_infer_request(
    body: bytes,
    *,
    header_length: str | None = None,
    content_encoding: str | None = None,
    max_body_bytes: int = 1 << 30,
) -> V2Request:
    """Parse an inference request body (JSON, or JSON + binary tensors) into numpy inputs."""
    body = _decompress(body, content_encoding, max_body_bytes)
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise BadRequestError(
                f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 < json_size <= len(body):
            raise BadRequestError(
                f"{HEADER_LENGTH} is {json_size}, but the body has {len(body)} bytes"
            )
        head, binary = body[:json_size], memoryview(body)[json_size:]
    else:
        head, binary = body, memoryview(b"")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length else f" (binary data needs the {HEADER_LENGTH} header)"
        raise BadRequestError(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(request, dict):
        raise BadRequestError("request body must be a JSON object with an 'inputs' list")

    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequestError("'parameters' must be an object")
    binary_data_output = _as_bool(
        parameters.get("binary_data_output", False), "parameters.binary_data_output"
    )
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f"'id' must be a string, got {request_id!r}")

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequestError("'inputs' must be a non-empty list of tensors")
    inputs: list[V2Input] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(raw, i, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequestError(
            f"the body has {len(binary)} bytes of binary tensor data but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    return V2Request(
        inputs=inputs,
        outputs=_decode_outputs(request.get("outputs")),
        id=request_id,
        binary_data_output=binary_data_output,
        parameters=parameters,
    )


def _decode_input(raw: Any, index: int, binary: memoryview, offset: int) -> tuple[V2Input, int]:
    """One ``$request_input``; returns it and the offset past its binary data."""
    if not isinstance(raw, dict):
        raise BadRequestError(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequestError(f"inputs[{index}] needs a 'name' string")
    datatype = raw.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise BadRequestError(
            f"input {name!r}: datatype {datatype!r} is not supported; the models take "
            f"{', '.join(INPUT_DATATYPES)}"
        )
    shape = check_shape(raw.get("shape"), f"input {name!r}: shape")
    count = elements(shape)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequestError(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise BadRequestError(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError(f"input {name!r}: binary_data_size must be an integer >= 0")
        if offset + size > len(binary):
            raise BadRequestError(
                f"input {name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        if size != count * 4:
            raise BadRequestError(
                f"input {name!r}: binary_data_size is {size} bytes, but shape {list(shape)} "
                f"of FP32 needs {count * 4}"
            )
        array = np.frombuffer(binary[offset : offset + size], dtype="<f4").reshape(shape)
        return V2Input(name, datatype, array.astype(np.float32, copy=False)), offset + size
    if "data" not in raw:
        raise BadRequestError(f"input {name!r} has neither 'data' nor binary_data_size")
    try:
        array = np.asarray(raw["data"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(
            f"input {name!r}: 'data' must be a (flat or nested) list of numbers: {exc}"
        ) from None
    if array.size != count:
        raise BadRequestError(
            f"input {name!r}: 'data' has {array.size} elements, shape {list(shape)} needs {count}"
        )
    return V2Input(name, datatype, array.reshape(shape)), offset


def _decode_outputs(raw: Any) -> list[V2Output] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequestError("'outputs' must be a list of {'name': ...} objects")
    outputs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError(f"outputs[{i}] needs a 'name' string")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"output {item['name']!r}: 'parameters' must be an object")
        if params.get("classification"):
            raise BadRequestError(
                f"output {item['name']!r}: the classification extension is not supported; "
                "ask for 'probabilities' and take the top k"
            )
        if "shared_memory_region" in params:
            raise BadRequestError(
                f"output {item['name']!r}: the shared-memory extension is not supported"
            )
        binary = params.get("binary_data")
        outputs.append(
            V2Output(
                item["name"],
                None if binary is None else _as_bool(binary, "parameters.binary_data"),
            )
        )
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise BadRequestError(f"'outputs' names an output twice: {names}")
    return outputs


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; ``outputs`` holds (name, array, as_binary)."""
    entries = []
    blobs: list[bytes] = []
    for name, array, as_binary in outputs:
        datatype = NP_TO_V2.get(array.dtype)
        if datatype is None:  # pragma: no cover - the service only produces the types above
            raise TypeError(f"no v2 datatype for {array.dtype}")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if as_binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()  # row-major, flattened
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + b"".join(blobs), headers


def tensor_metadata(name: str, datatype: str, shape: list[Any]) -> dict[str, Any]:
    """A ``$metadata_tensor``: variable dimensions (symbolic or None) become -1."""
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    return {"name": name, "datatype": datatype, "shape": dims}
