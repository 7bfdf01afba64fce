"""Optional static INT8 quantization of an exported model, with its accuracy change.

onnxruntime's static quantizer (QDQ format, per-channel weights) calibrated on held-out
data. Only Conv, Gemm and MatMul are quantized: the activation nodes stay in float so the
service can still observe them, and their reference profile is re-measured on the INT8 graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from service.metadata import ModelMetadata, ReferenceProfile
from training.export import (
    ExportResult,
    atomic_write_bytes,
    cpu_session,
    onnx_accuracy,
    set_metadata,
    target_path,
)
from training.stats import LayerAccumulator

CALIBRATION_SAMPLES = 512


class _Batches(CalibrationDataReader):
    """Feeds held-out batches to the calibrator."""

    def __init__(self, x: np.ndarray, batch_size: int = 64):
        self._batches = iter(
            [{"input": x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_proto(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static INT8 quantization of conv/dense weights and activations feeding them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quantize_static(
            str(src),
            str(dst),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
        )
        return onnx.load(str(dst))


def reference_from_onnx(
    proto: onnx.ModelProto, meta: ModelMetadata, x: np.ndarray
) -> ReferenceProfile:
    """Per-layer activity of the activation tensors of an ONNX graph on held-out x."""
    layers = meta.activations
    session = cpu_session(proto, [layer.tensor for layer in layers])
    accumulators = [LayerAccumulator(layer.name, layer.kind) for layer in layers]
    for start in range(0, len(x), 256):
        outputs = session.run([layer.tensor for layer in layers], {"input": x[start : start + 256]})
        for acc, out in zip(accumulators, outputs, strict=True):
            acc.update(torch.from_numpy(out))
    profiles = {acc.name: acc.result().to_profile() for acc in accumulators}
    return ReferenceProfile(samples=len(x), layers=profiles)


def quantize_export(
    result: ExportResult,
    *,
    root: Path,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    overwrite: bool,
) -> None:
    """Write ``<name>-int8/<version>/model.onnx`` and record the accuracy change in result."""
    proto, meta = result.proto, result.metadata
    x, y = val_x.numpy(), val_y.numpy()
    int8 = quantize_proto(proto, x[:CALIBRATION_SAMPLES])
    accuracy = onnx_accuracy(int8, x, y)
    name = f"{meta.name}-int8"
    path, _ = target_path(root, name, result.version, overwrite)
    int8_meta = meta.model_copy(deep=True)
    int8_meta.name, int8_meta.quantized = name, True
    if meta.reference is None:  # export_model always measures one
        raise ValueError(f"model {meta.name!r} has no reference profile to size the int8 one")
    int8_meta.reference = reference_from_onnx(int8, meta, x[: meta.reference.samples])
    int8_meta.training = {
        **meta.training,
        "onnx_accuracy": accuracy,
        "fp32_accuracy": result.accuracy,
        "accuracy_change": accuracy - result.accuracy,
    }
    set_metadata(int8, int8_meta)
    atomic_write_bytes(path, int8.SerializeToString())
    result.quantized_path, result.quantized_accuracy = path, accuracy
