"""BentoML serving the same ONNX model with its adaptive batching (run with .venv-bench).

Request: JSON ``{"x": "<base64 float32>"}`` is not a BentoML type, so the input is the
documented ``np.ndarray`` one: ``{"x": nested lists (1, C, H, W)}``; answer probabilities.
``BENCH_MODEL=... bentoml serve bench.apps.bentoml_service:Classifier --port PORT``
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1, traffic={"timeout": 30})
class Classifier:
    """One ONNX session; BentoML batches requests along axis 0."""

    def __init__(self) -> None:
        self.session = ort.InferenceSession(
            os.environ["BENCH_MODEL"], providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=10_000)
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a batch (N, C, H, W)."""
        (logits,) = self.session.run(None, {self.input_name: x.astype(np.float32)})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
