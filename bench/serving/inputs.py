"""What the servers under test are sent: the benchmark's models, one seeded input per model,
and each request kind (path, headers, body) built from it once: our service's JSON, binary,
v2 and image requests, and raw ``application/octet-stream`` bodies for the servers that take
them without a shape header."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = ("digits", "resnet20")


@dataclass
class Request:
    """One kind of request: path, headers and body."""

    path: str
    headers: dict[str, str]
    body: bytes


def sample_input(model_path: Path) -> tuple[str, np.ndarray]:
    """The model's input name and one seeded input (1, C, H, W) in the model's range."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [1, *[int(d) for d in meta.shape[1:]]]
    rng = np.random.default_rng(0)
    return meta.name, rng.standard_normal(shape).astype(np.float32)


def png_bytes(x: np.ndarray) -> bytes:
    """A PNG of the model's input size: grayscale or RGB."""
    from PIL import Image

    _, c, h, w = x.shape
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (h, w, 3) if c == 3 else (h, w), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB" if c == 3 else "L").save(buffer, format="PNG")
    return buffer.getvalue()


def our_requests(model: str, input_name: str, x: np.ndarray) -> dict[str, Request]:
    """The request kinds of our service for one model."""
    raw = x.tobytes()
    shape = ",".join(str(d) for d in x.shape)
    b64 = base64.b64encode(raw).decode()
    json_h = {"Content-Type": "application/json"}
    bin_h = {"Content-Type": "application/octet-stream", "X-Tensor-Shape": shape}
    tensor = {"shape": list(x.shape), "data": b64}
    v2_head = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    boundary = "benchboundary7MA4YWxkTrZu0gW"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes(x)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    predict = f"/v1/models/{model}/predict"
    return {
        "json-b64": Request(predict, json_h, json.dumps({"tensor": tensor}).encode()),
        "binary": Request(predict, bin_h, raw),
        "v2-binary": Request(
            f"/v2/models/{model}/infer",
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(v2_head)),
            },
            v2_head + raw,
        ),
        "image": Request(
            predict, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, multipart
        ),
        "json-b64+stats": Request(
            predict, json_h, json.dumps({"tensor": tensor, "stats": "summary"}).encode()
        ),
        "binary+stats": Request(predict + "?stats=summary", bin_h, raw),
    }


def octet_stream(path: str, body: bytes) -> Request:
    """A POST of raw bytes (``application/octet-stream``), for the servers that take them
    without a shape header."""
    return Request(path, {"Content-Type": "application/octet-stream"}, body)
