"""Helpers for the HTTP tests: settings for a fixture repository, image bytes, the oracle."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
from PIL import Image

from service.settings import ServiceSettings, load_settings
from tests.service.conftest import numpy_layer_stats, reference_inputs, run_with_activations

TINY_LAYERS = ("features.0.act", "features.1.act")


def make_settings(model_root: Path, **overrides: Any) -> ServiceSettings:
    """Settings for tests: the given repository, one thread, environment ignored."""
    values: dict[str, Any] = {
        "model_root": model_root,
        "intra_op_threads": 1,
        "log_level": "warning",
    }
    values.update(overrides)
    return load_settings(**values)


def image_bytes(
    fmt: str = "PNG", size: tuple[int, int] = (8, 8), mode: str = "L", seed: int = 0
) -> bytes:
    """A seeded random image of ``size`` (W, H) in ``mode``, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def tiny_preprocess(data: bytes) -> np.ndarray:
    """The tiny fixture model's preprocessing, written independently of service.core.images:
    grayscale, bilinear 8x8, [0, 1], (x - 0.5) / 0.25 -> (1, 1, 8, 8) float32."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((8, 8), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.25).astype(np.float32)[None, None]


def oracle(model_path: Path, x: np.ndarray) -> dict[str, Any]:
    """Logits, softmax probabilities and per-layer numpy statistics for ``x``, straight from
    onnxruntime on the raw activations (the conftest oracle)."""
    model = onnx.load(str(model_path))
    from service.metadata import ModelMetadata

    metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    assert metadata is not None
    tensors = [layer.tensor for layer in metadata.activations]
    outputs = run_with_activations(model, x, tensors)
    logits = outputs[metadata.output_name]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {
        "logits": logits,
        "probabilities": shifted / shifted.sum(axis=1, keepdims=True),
        "layers": {
            layer.name: numpy_layer_stats(outputs[layer.tensor], layer.kind)
            for layer in metadata.activations
        },
    }


def error_of(response: Any) -> dict[str, str]:
    """The ``{"error": {"code", "message"}}`` body of a /v1 error, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return body["error"]


def predict_body(batch: int = 16, seed: int | None = None) -> bytes:
    """A /v1 predict JSON body of ``batch`` reference inputs of the tiny model, base64."""
    x = reference_inputs(batch, seed=batch if seed is None else seed)  # (N, 1, 8, 8)
    tensor = {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}
    return orjson.dumps({"tensor": tensor})
