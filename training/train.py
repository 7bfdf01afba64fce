"""Train a ReLU-family CNN and record, every epoch, what each activation layer does.

Plain functions in the torchvision-references shape: ``train_one_epoch``, ``evaluate``,
``run_training(cfg)``. Multi-process training runs under ``torchrun`` (PyTorch DDP, gloo on
CPU): each process takes every world_size-th sample of a shared, seeded permutation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from training.architectures import ActivationSpec, count_parameters, create_model
from training.config import OPTIMIZERS, SCHEDULES, TrainConfig
from training.data import DataBundle, load_data
from training.report import write_report
from training.stats import measure_layers

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"


@dataclass
class TrainResult:
    """What a finished run leaves behind, in memory and in ``run_dir``."""

    run_dir: Path | None
    config: TrainConfig
    history: list[dict]
    final_val_accuracy: float
    best_val_accuracy: float
    epochs_to_target: int | None
    train_time_s: float
    model: nn.Module = field(repr=False)
    bundle: DataBundle = field(repr=False)


def _world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def validate_config(cfg: TrainConfig) -> None:
    """Fail early, with the valid choices, on a config that cannot run."""
    ActivationSpec(cfg.activation)  # raises with the valid choices
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    for name in ("epochs", "batch_size", "stats_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {cfg.val_fraction}")


def build_model(cfg: TrainConfig, bundle: DataBundle) -> nn.Module:
    """The configured architecture, sized for the data."""
    act = ActivationSpec(cfg.activation, negative_slope=cfg.negative_slope)
    return create_model(
        cfg.arch,
        activation=act,
        in_channels=bundle.channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
        batch_norm=cfg.batch_norm,
        init=cfg.init,
    )


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x is (N, C, H, W) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment_batch(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random integer shifts of up to ~10% of the side (zero padded), per sample, vectorised."""
    n, _, h, w = x.shape
    pad = max(1, round(0.1 * min(h, w)))
    padded = F.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)  # (N, 1, H, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)  # (N, 1, 1, W)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows, cols]  # (N, 1, H, W, C)
    out = out.squeeze(1).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum, as configured."""
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> LRScheduler | None:
    """A per-step learning-rate schedule (None for a constant rate)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    cfg: TrainConfig,
    epoch: int,
    mean: list[float],
    std: list[float],
    progress: bool,
) -> dict:
    """One pass over this process's share of the training data (x in [0, 1], unnormalised)."""
    rank, world = _world()
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    # The same permutation on every rank; equal shares, so no rank waits on a missing step.
    usable = len(x) // world * world
    perm = torch.randperm(len(x), generator=generator)[:usable][rank::world]
    steps = math.ceil(len(perm) / cfg.batch_size)
    model.train()
    loss_sum = torch.zeros(())
    errors = torch.zeros(())
    seen = torch.zeros(())
    bar = _progress(range(steps), progress and rank == 0, f"epoch {epoch}")
    for step in bar:
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        xb, yb = x[idx], y[idx]
        if cfg.augment:
            # Before normalising, so the zero padding is the images' own background.
            xb = augment_batch(xb, generator, flip=xb.shape[1] == 3)
        logits = model(normalize(xb, mean, std))  # (B, classes)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(idx)
        errors += (logits.argmax(1) != yb).sum()
        seen += len(idx)
    totals = torch.stack([loss_sum, errors, seen])
    if world > 1:
        dist.all_reduce(totals)
    return {
        "train_loss": (totals[0] / totals[2]).item(),
        "train_error": (totals[1] / totals[2]).item(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict:
    """Loss and accuracy on held-out data."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return {"val_loss": loss / len(x), "val_accuracy": correct / len(x)}


def _progress(iterable: Iterable[int], enabled: bool, desc: str) -> Iterable[int]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def run_dir_for(cfg: TrainConfig) -> Path:
    """Where a run writes: <out>/<name>, the name defaulting to <arch>-<activation>-<data>."""
    name = cfg.name or f"{cfg.arch}-{cfg.activation}-{cfg.data}"
    return Path(cfg.out) / name


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or the last checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state: dict = torch.load(path, map_location="cpu", weights_only=False)
    return state


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_bundle(cfg: TrainConfig) -> DataBundle:
    """The configured data set."""
    return load_data(
        cfg.data,
        cfg.data_path,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
        limit=cfg.limit,
    )


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train as configured (resuming if asked) and leave a run folder; see module docstring."""
    resume_state = None
    if cfg.resume:
        resume_state = load_checkpoint(cfg.resume)
        saved = TrainConfig.from_dict(resume_state["config"])
        if saved.epochs != cfg.epochs and saved.schedule != "none":
            raise ValueError(
                f"cannot change epochs from {saved.epochs} to {cfg.epochs} on resume with the "
                f"{saved.schedule!r} schedule; its learning rate is planned for {saved.epochs}"
            )
        saved.epochs, saved.resume, saved.progress = cfg.epochs, cfg.resume, cfg.progress
        cfg = saved
    validate_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # started by torchrun: CPU processes talk over gloo
    rank, world = _world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    bundle = load_bundle(cfg)
    mean, std = bundle.mean_std()
    val_x = normalize(bundle.val_x, mean, std)
    stats_x, stats_y = val_x[: cfg.stats_samples], bundle.val_y[: cfg.stats_samples]

    model = build_model(cfg, bundle)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(bundle.train_x) // world / cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    history: list[dict] = []
    start_epoch = 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        history = resume_state["history"]
        start_epoch = resume_state["epoch"] + 1
        torch.set_rng_state(resume_state["torch_rng"])

    run_dir = run_dir_for(cfg) if rank == 0 else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _write_history(run_dir, history)
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch}
        record.update(
            train_one_epoch(
                net,
                optimizer,
                scheduler,
                bundle.train_x,
                bundle.train_y,
                cfg=cfg,
                epoch=epoch,
                mean=mean,
                std=std,
                progress=cfg.progress,
            )
        )
        record["lr"] = optimizer.param_groups[0]["lr"]
        if rank == 0:
            record.update(evaluate(model, val_x, bundle.val_y))
            layers = measure_layers(model, stats_x, stats_y)
            record["layers"] = {s.name: s.to_record() for s in layers}
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        record["epoch_time_s"] = epoch_time
        record["elapsed_s"] = elapsed
        history.append(record)
        if run_dir is not None:
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            _save_checkpoint(
                run_dir / CHECKPOINT,
                _checkpoint(cfg, model, optimizer, scheduler, epoch, history, bundle),
            )
            log.info(
                "epoch %d: train error %.4f, held-out accuracy %.4f (%.1fs)",
                epoch,
                record["train_error"],
                record["val_accuracy"],
                epoch_time,
            )
    return _finish(cfg, run_dir, model, bundle, history)


def _checkpoint(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    epoch: int,
    history: list[dict],
    bundle: DataBundle,
) -> dict:
    mean, std = bundle.mean_std()
    return {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "data": {
            "labels": bundle.labels,
            "channels": bundle.channels,
            "image_size": list(bundle.image_size),
            "mean": mean,
            "std": std,
            "source": bundle.source,
            "held_out": bundle.held_out,
        },
    }


def _write_history(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl to exactly the given history (a resumed run drops later lines)."""
    with (run_dir / "metrics.jsonl").open("w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")


def _finish(
    cfg: TrainConfig,
    run_dir: Path | None,
    model: nn.Module,
    bundle: DataBundle,
    history: list[dict],
) -> TrainResult:
    accuracies = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    target = None
    if cfg.target_error is not None:
        target = next((r["epoch"] for r in history if r["train_error"] <= cfg.target_error), None)
    result = TrainResult(
        run_dir=run_dir,
        config=cfg,
        history=history,
        final_val_accuracy=accuracies[-1] if accuracies else float("nan"),
        best_val_accuracy=max(accuracies) if accuracies else float("nan"),
        epochs_to_target=target,
        train_time_s=history[-1]["elapsed_s"] if history else 0.0,
        model=model,
        bundle=bundle,
    )
    if run_dir is not None:
        summary = {
            "final_val_accuracy": result.final_val_accuracy,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs_to_target": target,
            "target_error": cfg.target_error,
            "train_time_s": result.train_time_s,
            "parameters": count_parameters(model),
            "held_out": bundle.held_out,
            "train_samples": len(bundle.train_x),
            "held_out_samples": len(bundle.val_x),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_report(run_dir, target_error=cfg.target_error)
    return result
