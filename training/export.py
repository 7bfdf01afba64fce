"""Export a trained model to a verified, self-describing ONNX file in the model repository.

Checks, each failing the export: ``onnx.checker`` full check; the dynamic batch axis (batch
sizes 1, 7 and 64 run in onnxruntime); parity of logits and of every activation layer
against PyTorch on held-out data (max abs difference at most 1e-4). The metadata contract
(``service.metadata.ModelMetadata``) goes into the file. It is written to
``<root>/<name>/<version>/model.onnx`` atomically and never overwrites unless asked.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.metadata import (
    METADATA_KEY,
    ActivationLayer,
    ModelMetadata,
    Preprocessing,
    ReferenceProfile,
)
from training.architectures import activation_kind, activation_layers
from training.stats import LayerStats, measure_layers

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
BATCH_SIZES_CHECKED = (1, 7, 64)
OPSET = 17


class ExportError(RuntimeError):
    """The export failed a check; nothing was written to the model repository."""


@dataclass
class ExportResult:
    """Where the file went and what the checks measured."""

    path: Path
    version: int
    max_abs_diff: float
    accuracy: float
    proto: onnx.ModelProto = field(repr=False)  # as written, metadata included
    metadata: ModelMetadata = field(repr=False)
    quantized_path: Path | None = None
    quantized_accuracy: float | None = None


def _module_name(node_name: str) -> str:
    """Module path from a TorchScript-exporter node name.

    "/stages/stages.0/stages.0.1/act2/Relu" -> "stages.0.1.act2": each scope is either a
    full dotted prefix of the next or a local attribute name.
    """
    name = ""
    for part in node_name.strip("/").split("/")[:-1]:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name


def next_version(model_dir: Path) -> int:
    """One more than the highest integer version folder (1 for a new model)."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def target_path(root: Path, name: str, version: int | None, overwrite: bool) -> tuple[Path, int]:
    """The model file to write; refuses an existing version unless overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"model name {name!r} must be a plain folder name")
    version = version if version is not None else next_version(root / name)
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    path = root / name / str(version) / "model.onnx"
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite to replace version {version}")
    return path, version


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a served model must be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Trace to ONNX with a dynamic batch axis; input "input", output "logits"."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter keeps module scopes in node names, which map activation
        # nodes back to layers, and needs no onnxscript; torch warns that it is legacy.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        return onnx.load(str(path))


def describe_activations(model: nn.Module, proto: onnx.ModelProto) -> list[ActivationLayer]:
    """Match every activation module to the graph node it became."""
    modules = dict(activation_layers(model))
    found = {_module_name(n.name): n for n in proto.graph.node if _module_name(n.name) in modules}
    missing = sorted(set(modules) - set(found))
    if missing:
        raise ExportError(f"activation layers not found in the ONNX graph: {missing}")
    probe = torch.zeros((1, *_input_shape(proto)))
    channels = {name: out.shape[1] for name, out in activation_outputs(model, probe).items()}
    return [
        ActivationLayer(
            name=name,
            kind=activation_kind(module),
            channels=channels[name],
            tensor=found[name].output[0],
            node=found[name].name,
        )
        for name, module in modules.items()
    ]


def _input_shape(proto: onnx.ModelProto) -> list[int]:
    """(C, H, W) of the graph input, whose batch axis is dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    return [d.dim_value for d in dims]


def activation_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run x through the model in eval mode and keep every activation layer's output."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o.detach()))
        for n, m in activation_layers(model)
    ]
    try:
        model.eval()
        with torch.no_grad():
            outputs["logits"] = model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def cpu_session(proto: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """An onnxruntime CPU session, optionally exposing intermediate tensors as outputs."""
    if extra_outputs:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        for tensor in extra_outputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module,
    proto: onnx.ModelProto,
    layers: list[ActivationLayer],
    x: torch.Tensor,
    *,
    batch_size: int = 256,
) -> float:
    """Max abs difference, over held-out x, of the logits and every activation layer."""
    session = cpu_session(proto, [layer.tensor for layer in layers])
    worst = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        expected = activation_outputs(model, xb)
        names = ["logits"] + [layer.name for layer in layers]
        got = session.run(["logits"] + [layer.tensor for layer in layers], {"input": xb.numpy()})
        for name, value in zip(names, got, strict=True):
            diff = float(np.max(np.abs(value - expected[name].numpy())))
            worst = max(worst, diff)
    return worst


def check_batch_axis(proto: onnx.ModelProto, example: torch.Tensor) -> None:
    """The exported graph runs at batch sizes 1, 7 and 64 and keeps the batch dimension."""
    session = cpu_session(proto)
    sample = example[:1].numpy()
    for n in BATCH_SIZES_CHECKED:
        logits = session.run(["logits"], {"input": np.repeat(sample, n, axis=0)})[0]
        if logits.shape[0] != n:
            raise ExportError(f"batch of {n} gave logits of shape {logits.shape}")


def onnx_accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of an ONNX model run by onnxruntime."""
    session = cpu_session(proto)
    correct = 0
    for start in range(0, len(x), 512):
        logits = session.run(None, {"input": x[start : start + 512]})[0]
        correct += int((logits.argmax(1) == y[start : start + 512]).sum())
    return correct / len(x)


def export_model(
    model: nn.Module,
    *,
    name: str,
    root: Path,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    labels: list[str],
    preprocessing: Preprocessing,
    architecture: str,
    activation: str,
    training: dict,
    version: int | None = None,
    overwrite: bool = False,
    stats_samples: int = 1000,
) -> ExportResult:
    """Export, verify and write ``model`` (val_x normalised, as the model takes it)."""
    path, version = target_path(root, name, version, overwrite)
    proto = to_onnx(model, val_x[:2])
    layers = describe_activations(model, proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the graph: {e}") from e
    check_batch_axis(proto, val_x)
    max_diff = check_parity(model, proto, layers, val_x)
    if max_diff > PARITY_TOLERANCE:
        raise ExportError(
            f"onnxruntime and PyTorch differ by {max_diff:.2e} on held-out data "
            f"(tolerance {PARITY_TOLERANCE:.0e})"
        )
    stats = measure_layers(model, val_x[:stats_samples], val_y[:stats_samples])
    accuracy = onnx_accuracy(proto, val_x.numpy(), val_y.numpy())
    meta = ModelMetadata(
        name=name,
        architecture=architecture,
        activation=activation,
        labels=labels,
        input_name="input",
        output_name="logits",
        preprocessing=preprocessing,
        activations=layers,
        reference=_reference(stats, min(stats_samples, len(val_x))),
        training={**training, "onnx_accuracy": accuracy, "parity_max_abs_diff": max_diff},
    )
    set_metadata(proto, meta)
    atomic_write_bytes(path, proto.SerializeToString())
    log.info("exported %s (held-out accuracy %.4f, parity %.1e)", path, accuracy, max_diff)
    return ExportResult(
        path=path, version=version, max_abs_diff=max_diff, accuracy=accuracy, proto=proto,
        metadata=meta,
    )  # fmt: skip


def _reference(stats: list[LayerStats], samples: int) -> ReferenceProfile:
    return ReferenceProfile(samples=samples, layers={s.name: s.to_profile() for s in stats})


def set_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Store the metadata contract in the file (replacing an older copy) and a doc string."""
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
    proto.doc_string = (
        f"{meta.architecture} with {meta.activation} activations; labels: "
        f"{', '.join(meta.labels[:10])}{' ...' if len(meta.labels) > 10 else ''}"
    )


def image_background(x: torch.Tensor) -> Literal["dark", "light"] | None:
    """ "dark" or "light" when the border pixels of the images (N, C, H, W) in [0, 1] agree."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    level = border.mean().item()
    if level < 0.2:
        return "dark"
    return "light" if level > 0.8 else None
