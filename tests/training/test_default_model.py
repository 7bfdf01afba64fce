"""The shipped default model: what the README promises about it holds."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.metadata import ModelMetadata
from training.data import load_data

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "digits" / "1" / "model.onnx"
# The README's command that reproduces it (the run folder and model root are redirected).
COMMAND = [
    "train",
    "--epochs",
    "30",
    "--name",
    "digits",
    "--export",
    "digits",
    "--version",
    "1",
    "--overwrite",
]


def _accuracy(path: Path) -> float:
    """Held-out accuracy on the documented split (digits, stratified 20%, seed 0)."""
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(path)).metadata_props})
    bundle = load_data("digits", val_fraction=0.2, seed=0)
    mean = np.array(meta.preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta.preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = (bundle.val_x.numpy() - mean) / std
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {meta.input_name: x.astype(np.float32)})[0]
    return float((logits.argmax(1) == bundle.val_y.numpy()).mean())


def test_shipped_model_reaches_98_percent_on_the_documented_split():
    assert _accuracy(DEFAULT_MODEL) >= 0.98


@pytest.mark.slow
def test_documented_command_reproduces_it(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "training",
        *COMMAND,
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--model-root",
        str(tmp_path / "models"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _accuracy(tmp_path / "models" / "digits" / "1" / "model.onnx") >= 0.98
