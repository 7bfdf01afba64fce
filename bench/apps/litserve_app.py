"""LitServe serving the same ONNX model with its dynamic batching (run with .venv-bench).

Request: JSON ``{"data": "<base64 float32>", "shape": [C, H, W]}``, one image; answer the
class probabilities. ``python bench/apps/litserve_app.py MODEL PORT``
"""

from __future__ import annotations

import base64
import sys

import litserve as ls
import numpy as np
import onnxruntime as ort


class OnnxAPI(ls.LitAPI):
    """One ONNX session; LitServe batches decoded requests into one run."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path

    def setup(self, device) -> None:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request):
        raw = base64.b64decode(request["data"])
        return np.frombuffer(raw, dtype=np.float32).reshape(request["shape"])

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        (logits,) = self.session.run(None, {self.input_name: x})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"probabilities": output.tolist()}


if __name__ == "__main__":
    api = OnnxAPI(sys.argv[1], max_batch_size=64, batch_timeout=0.001)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(port=int(sys.argv[2]), host="127.0.0.1", generate_client_file=False)
