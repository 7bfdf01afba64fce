"""The README's first command: ./scripts/serve installs and serves the shipped default model."""

import io
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_helpers import REPO_ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _digit_one_png() -> bytes:
    """A dark "1" on white paper, as a person would draw it (the model saw light on dark)."""
    pixels = np.full((64, 64), 255, dtype=np.uint8)
    pixels[8:56, 28:36] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_script_answers_a_prediction_on_the_default_model():
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port)}
    process = subprocess.Popen(
        [str(REPO_ROOT / "scripts" / "serve")], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a first run installs the serving dependencies
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "scripts/serve not ready within 300 s"
            time.sleep(0.2)
        files = {"file": ("digit.png", _digit_one_png(), "image/png")}
        response = httpx.post(f"{url}/v1/models/digits/predict", files=files, timeout=10)
        assert response.status_code == 200, response.text
        top = response.json()["predictions"][0]["top_k"][0]
        assert top["label"] == "1"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0
