"""Training configuration: one dataclass, filled from argparse, saved next to every run."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import cast

from training.architectures import INITS, list_models
from training.data import DATA_KINDS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "none")


@dataclass
class TrainConfig:
    """Everything that determines a training run; written to ``config.json`` in the run folder."""

    data: str = "digits"
    data_path: str | None = None
    arch: str = "small_cnn"
    activation: str = "relu"
    negative_slope: float = 0.01
    init: str = "he"
    batch_norm: bool = True
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "onecycle"
    augment: bool = True
    seed: int = 0
    val_fraction: float = 0.2
    limit: int | None = None
    image_size: tuple[int, int] | None = None
    out: str = "runs"
    name: str | None = None
    resume: str | None = None
    stats_samples: int = 1000
    target_error: float | None = None
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """Inverse of to_dict; unknown keys are an error so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        cfg = cls(**raw)
        if cfg.image_size is not None:
            # JSON gives a list: back to the tuple the field holds (data.py checks the values)
            cfg.image_size = cast("tuple[int, int]", tuple(cfg.image_size))
        return cfg


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"image size {text!r} must look like 28x28")
    return int(parts[0]), int(parts[1])


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The training flags, shared by `train` and `compare`."""
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d.data, help=f"data kind: {', '.join(DATA_KINDS)}")
    g.add_argument("--data-path", help="folder of the data set (idx, folder, cifar10)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="held-out share when the data has no test split",
    )
    g.add_argument("--limit", type=int, help="use at most this many training samples")
    g.add_argument("--image-size", type=_size, help="resize folder images to HxW, e.g. 32x32")
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=d.arch, help=f"architecture: {', '.join(list_models())}")
    g.add_argument(
        "--activation",
        default=d.activation,
        help="relu, leaky_relu, prelu, elu, relu6, sigmoid or tanh",
    )
    g.add_argument(
        "--negative-slope",
        type=float,
        default=d.negative_slope,
        help="slope of leaky_relu for x < 0",
    )
    g.add_argument("--init", default=d.init, help=f"weight initialisation: {', '.join(INITS)}")
    g.add_argument(
        "--no-batch-norm",
        dest="batch_norm",
        action="store_false",
        help="build the network without batch normalisation",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="number of epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per-process batch size")
    g.add_argument("--lr", type=float, default=d.lr, help="(peak) learning rate")
    g.add_argument("--optimizer", default=d.optimizer, help=f"one of {', '.join(OPTIMIZERS)}")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--schedule", default=d.schedule, help=f"lr schedule: {', '.join(SCHEDULES)}")
    g.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random shifts of the training images",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (runs are deterministic)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="parent folder of run folders")
    g.add_argument("--name", help="run folder name (default: <arch>-<activation>-<data>)")
    g.add_argument("--resume", help="checkpoint file or run folder to resume from")
    g.add_argument(
        "--stats-samples",
        type=int,
        default=d.stats_samples,
        help="held-out samples used for per-layer statistics each epoch",
    )
    g.add_argument(
        "--target-error",
        type=float,
        help="record the first epoch whose training error is at most this",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a TrainConfig from parsed arguments (ignoring flags that are not config fields)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
