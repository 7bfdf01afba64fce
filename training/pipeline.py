"""From a trained model to files in the model repository: export, then optional quantization.

``export_trained`` takes a model just trained (``training.train``), ``export_checkpoint`` a
checkpoint or run folder; both end in ``training.export.export_model`` (the verified float
file) and, when asked, ``training.quantize.quantize_export`` (its INT8 copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from torch import nn

from service.metadata import Preprocessing
from training.config import TrainConfig
from training.data import DataBundle
from training.export import ExportError, ExportResult, export_model, image_background, target_path
from training.quantize import quantize_export
from training.train import build_model, load_bundle, load_checkpoint, normalize


def export_checkpoint(
    source: str | Path,
    *,
    root: Path,
    name: str,
    version: int | None = None,
    overwrite: bool = False,
    quantize: bool = False,
) -> ExportResult:
    """Re-export from a checkpoint file or run folder, without retraining."""
    state = load_checkpoint(source)
    cfg = TrainConfig.from_dict(state["config"])
    data = state["data"]
    bundle = load_bundle(cfg)  # the held-out split is a pure function of the config
    if bundle.labels != data["labels"] or list(bundle.image_size) != data["image_size"]:
        raise ExportError(
            f"the data at {cfg.data_path or cfg.data} no longer matches the checkpoint "
            f"(labels or image size changed)"
        )
    model = build_model(cfg, bundle)
    model.load_state_dict(state["model"])
    return export_trained(
        model,
        cfg,
        bundle,
        state["history"],
        root=root,
        name=name,
        version=version,
        overwrite=overwrite,
        quantize=quantize,
    )


def export_trained(
    model: nn.Module,
    cfg: TrainConfig,
    bundle: DataBundle,
    history: list[dict[str, Any]],
    *,
    root: Path,
    name: str,
    version: int | None = None,
    overwrite: bool = False,
    quantize: bool = False,
) -> ExportResult:
    """Export a model trained by training.train with the run's config, data and history;
    with ``quantize``, also its static INT8 copy as ``<name>-int8``, same version."""
    if quantize:  # refuse before any work, not after the float model is written
        target_path(root, f"{name}-int8", version, overwrite)
    mean, std = bundle.mean_std()
    h, w = bundle.image_size
    last = history[-1] if history else {}
    val_x = normalize(bundle.val_x, mean, std)
    result = export_model(
        model,
        name=name,
        root=root,
        val_x=val_x,
        val_y=bundle.val_y,
        labels=bundle.labels,
        preprocessing=Preprocessing(
            height=h,
            width=w,
            # 1 or 3 (load_data converts to these); pydantic checks it at run time
            channels=cast("Literal[1, 3]", bundle.channels),
            mean=mean,
            std=std,
            background=image_background(bundle.train_x),
        ),
        architecture=cfg.arch,
        activation=cfg.activation,
        training={
            "data": bundle.source,
            "held_out": bundle.held_out,
            "train_samples": len(bundle.train_x),
            "held_out_samples": len(bundle.val_x),
            "epochs": last.get("epoch"),
            "val_accuracy": last.get("val_accuracy"),
            "config": cfg.to_dict(),
        },
        version=version,
        overwrite=overwrite,
        stats_samples=cfg.stats_samples,
    )
    if quantize:
        quantize_export(result, root=root, val_x=val_x, val_y=bundle.val_y, overwrite=overwrite)
    return result
