"""Command line: ``python -m training {train,compare,export,download}`` (or ``relu-train``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from training.compare import add_compare_args, main_compare
from training.config import add_train_args, config_from_args
from training.data import DataError
from training.download import download_dataset
from training.export import ExportError, ExportResult, target_path
from training.pipeline import export_checkpoint, export_trained
from training.train import run_training, validate_config

DEFAULT_MODEL_ROOT = Path(__file__).resolve().parent.parent / "models"


def _add_export_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--export",
        dest="export_name",
        required=required,
        metavar="NAME",
        help="export to <model-root>/NAME/<version>/model.onnx"
        + ("" if required else " after training"),
    )
    parser.add_argument(
        "--model-root",
        type=Path,
        default=DEFAULT_MODEL_ROOT,
        help="model repository root (default: the repository's models/)",
    )
    parser.add_argument(
        "--version", type=int, help="version to write (default: one more than the highest)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the version if it exists")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="also write a static INT8 model as NAME-int8, same version",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser with its four sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train ReLU-family CNNs, record per-layer activation evidence, export ONNX.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one model and leave a run folder",
        description="Train one model; the run folder gets config.json, "
        "metrics.jsonl, checkpoints/ and a report with plots.",
    )
    add_train_args(train)
    _add_export_args(train, required=False)

    compare = sub.add_parser(
        "compare",
        help="train one architecture with several activations",
        description="Same architecture, data, seed and budget; one run "
        "per activation; prints and plots the table.",
    )
    add_train_args(compare)
    add_compare_args(compare)

    export = sub.add_parser(
        "export",
        help="export a checkpoint to the model repository",
        description="Re-export a trained run (checkpoint file or run folder) without retraining.",
    )
    export.add_argument("checkpoint", help="checkpoint file or run folder")
    _add_export_args(export, required=True)

    download = sub.add_parser(
        "download",
        help="download a public data set (needs a network)",
        description="Download and SHA-256-verify MNIST, Fashion-MNIST or CIFAR-10.",
    )
    download.add_argument("dataset", help="mnist, fashion_mnist or cifar10")
    download.add_argument(
        "--dest", type=Path, default=Path("data"), help="folder to download into (default: data/)"
    )
    download.add_argument("--base-url", help="mirror to download from instead")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "download":
        folder = download_dataset(args.dataset, args.dest / args.dataset, base_url=args.base_url)
        print(f"{args.dataset}: {folder}")
        return
    if args.command == "export":
        exported = export_checkpoint(
            args.checkpoint,
            root=args.model_root,
            name=args.export_name,
            version=args.version,
            overwrite=args.overwrite,
            quantize=args.quantize,
        )
        _print_export(exported)
        return
    cfg = config_from_args(args)
    if args.command == "compare":
        main_compare(args, cfg)
        return
    validate_config(cfg)
    if args.export_name:  # fail on an existing version before training, not after
        target_path(args.model_root, args.export_name, args.version, args.overwrite)
    result = run_training(cfg)
    if result.run_dir is None:  # a non-zero torchrun rank: rank 0 reports and exports
        return
    print(f"run folder: {result.run_dir}")
    print(
        f"held-out accuracy: {result.final_val_accuracy:.4f} "
        f"(best {result.best_val_accuracy:.4f}), {result.train_time_s:.1f}s"
    )
    if args.export_name:
        _print_export(
            export_trained(
                result.model,
                cfg,
                result.bundle,
                result.history,
                root=args.model_root,
                name=args.export_name,
                version=args.version,
                overwrite=args.overwrite,
                quantize=args.quantize,
            )
        )


def _print_export(result: ExportResult) -> None:
    print(
        f"exported: {result.path} (held-out accuracy {result.accuracy:.4f}, "
        f"max |onnx - torch| {result.max_abs_diff:.1e})"
    )
    if result.quantized_path is not None and result.quantized_accuracy is not None:
        change = result.quantized_accuracy - result.accuracy
        print(
            f"int8: {result.quantized_path} (held-out accuracy {result.quantized_accuracy:.4f},"
            f" change {change:+.4f})"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; a failure prints one line naming the problem and exits non-zero."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    distributed = dist.is_available()
    try:
        _run(args)
        if distributed and dist.is_initialized():
            # Rank 0 still evaluates, checkpoints and exports after the others' last step:
            # a rank that tore its process group down then (and exited) made gloo abort
            # that rank ("terminate called without an active exception") under load.
            dist.barrier()
    except (DataError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
