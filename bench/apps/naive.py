"""The baseline a user would write: FastAPI + onnxruntime, one request = one
``session.run``, a pydantic model with JSON lists of floats, a sync endpoint (FastAPI runs it
in its thread pool), a default ``InferenceSession``.

    BENCH_MODEL=path/model.onnx uvicorn bench.apps.naive:app
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()
session = ort.InferenceSession(os.environ["BENCH_MODEL"], providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name


class PredictRequest(BaseModel):
    """A batch of images as nested lists: (N, C, H, W)."""

    data: list[list[list[list[float]]]]


class PredictResponse(BaseModel):
    """Class probabilities per image."""

    probabilities: list[list[float]]


@app.post("/predict")
def predict(request: PredictRequest) -> PredictResponse:
    """Run the model on the batch, softmax, answer."""
    x = np.asarray(request.data, dtype=np.float32)
    (logits,) = session.run(None, {input_name: x})
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return PredictResponse(probabilities=(z / z.sum(axis=1, keepdims=True)).tolist())


@app.get("/health")
def health() -> dict:
    """200 once the model is loaded."""
    return {"ok": True}
