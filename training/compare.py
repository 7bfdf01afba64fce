"""Train one architecture with several activations on the same data, seed and budget; compare.

The claim under test is Krizhevsky et al. (2012), Fig. 1: a four-layer CNN with ReLUs reached
25% training error on CIFAR-10 six times faster (in epochs) than the same net with tanh. Each
activation gets its own ordinary run folder (``<out>/<name>-<activation>``, with its own
report); the comparison writes ``compare.json``, ``compare.md`` and ``compare.png`` into its
own folder and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from service.metadata import ACTIVATION_KINDS, SATURATING_KINDS
from training.config import TrainConfig, config_from_args
from training.report import epochs_to_error
from training.train import run_training

# Krizhevsky et al. (2012), Fig. 1: the training error both nets were timed to.
DEFAULT_TARGET_ERROR = 0.25
DEFAULT_ACTIVATIONS = "relu,tanh,sigmoid"
# Speed-ups are measured against the saturating baseline of the paper.
BASELINE = "tanh"

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"


@dataclass
class ActivationRun:
    """One finished run of the comparison: its activation and per-epoch history."""

    activation: str
    history: list[dict]
    train_time_s: float
    run_dir: Path | None = None


def validate_activations(names: Sequence[str]) -> list[str]:
    """The activation kinds as a list, or ValueError naming the bad ones and the valid choices."""
    names = [n.strip() for n in names if n.strip()]
    valid = ", ".join(ACTIVATION_KINDS)
    if not names:
        raise ValueError(f"no activations given; choose from {valid}")
    unknown = [n for n in names if n not in ACTIVATION_KINDS]
    if unknown:
        raise ValueError(
            f"unknown activation(s) {', '.join(map(repr, unknown))}; choose from {valid}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"activation(s) listed twice: {', '.join(duplicates)}")
    return names


def parse_activations(text: str) -> list[str]:
    """Argparse type for a comma-separated list of activation kinds."""
    try:
        return validate_activations(text.split(","))
    except ValueError as e:
        # ArgumentTypeError keeps the message; a ValueError would become "invalid value".
        raise argparse.ArgumentTypeError(str(e)) from e


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `compare` beyond the training flags (added by add_train_args)."""
    g = parser.add_argument_group("comparison")
    g.add_argument(
        "--activations",
        type=parse_activations,
        default=parse_activations(DEFAULT_ACTIVATIONS),
        help=f"comma-separated activations to train, from {', '.join(ACTIVATION_KINDS)} "
        f"(default: {DEFAULT_ACTIVATIONS})",
    )
    # add_train_args already defines --target-error (each run records its epochs to target);
    # compare reads the same flag, so add it only where the training flags are absent.
    with contextlib.suppress(argparse.ArgumentError):
        g.add_argument(
            "--target-error",
            type=float,
            help=f"training error to time each activation to (default {DEFAULT_TARGET_ERROR})",
        )
    g.add_argument(
        "--compare-out",
        type=Path,
        help="folder for compare.json/.md/.png (default: <out>/<name>-compare)",
    )


def main_compare(args: argparse.Namespace, base: TrainConfig | None = None) -> int:
    """Run `compare` from parsed arguments (training flags plus add_compare_args); exit code."""
    if base is None:
        base = config_from_args(args)
    target = args.target_error if args.target_error is not None else DEFAULT_TARGET_ERROR
    out_dir = args.compare_out or Path(base.out) / f"{_base_name(base)}-compare"
    compare(base, args.activations, target, out_dir)
    return 0


def compare(
    base: TrainConfig, activations: Sequence[str], target_error: float, out_dir: Path
) -> list[dict]:
    """Train ``base`` once per activation; write, print and return the comparison table."""
    # Checked before the first run, not after an hour of training the others.
    activations = validate_activations(activations)
    if not 0 < target_error < 1:
        raise ValueError(f"target error must be between 0 and 1, got {target_error}")
    if base.resume:
        raise ValueError("compare trains every activation from scratch; drop --resume")

    runs = []
    name = _base_name(base)
    for i, activation in enumerate(activations, start=1):
        # Only the activation (and the run name) changes: same data, seed, epochs and lr.
        cfg = dataclasses.replace(
            base, activation=activation, name=f"{name}-{activation}", target_error=target_error
        )
        if _is_main_process():
            print(f"[{i}/{len(activations)}] training {cfg.arch} with {activation}", flush=True)
        result = run_training(cfg)
        # Keep only the numbers: the result also holds the model and data, which add up.
        runs.append(ActivationRun(activation, result.history, result.train_time_s, result.run_dir))

    rows = build_rows(runs, target_error)
    if _is_main_process():
        write_comparison(runs, rows, target_error, Path(out_dir), base_config=base.to_dict())
        print(format_text_table(rows, target_error))
        print(f"\nwritten to {Path(out_dir) / COMPARE_MD}")
    return rows


def build_rows(runs: Sequence[ActivationRun], target_error: float) -> list[dict]:
    """One table row per run: accuracy, epochs to target, dead units, time, speed-up vs tanh."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        accuracies = [r["val_accuracy"] for r in run.history if r.get("val_accuracy") is not None]
        layers = run.history[-1].get("layers", {}) if run.history else {}
        inactive = [
            s["inactive_fraction"]
            for s in layers.values()
            if s.get("inactive_fraction") is not None
        ]
        rows.append(
            {
                "activation": run.activation,
                "final_val_accuracy": accuracies[-1] if accuracies else None,
                "best_val_accuracy": max(accuracies) if accuracies else None,
                "epochs_to_target": epochs_to_error(run.history, target_error),
                "epochs": len(run.history),
                "dead_units": sum(s.get("dead_units") or 0 for s in layers.values()),
                "total_units": sum(s.get("channels") or 0 for s in layers.values()),
                # Unweighted mean over layers: each layer counts once, whatever its width.
                "mean_inactive_fraction": sum(inactive) / len(inactive) if inactive else None,
                "train_time_s": run.train_time_s,
                "speedup_vs_tanh": None,
                "run_dir": str(run.run_dir) if run.run_dir is not None else None,
            }
        )
    baseline = next((r for r in rows if r["activation"] == BASELINE), None)
    if baseline is not None and baseline["epochs_to_target"] is not None:
        for row in rows:
            if row["epochs_to_target"] is not None:
                row["speedup_vs_tanh"] = baseline["epochs_to_target"] / row["epochs_to_target"]
    return rows


_HEADERS = (
    "activation",
    "final acc",
    "best acc",
    "epochs to {target}",
    "dead units",
    "mean inactive",
    "time (s)",
    "speed-up vs tanh",
)


def _cells(row: dict) -> list[str]:
    reached = row["epochs_to_target"]
    return [
        row["activation"],
        _fmt(row["final_val_accuracy"], ".4f"),
        _fmt(row["best_val_accuracy"], ".4f"),
        str(reached) if reached is not None else f"not reached in {row['epochs']}",
        f"{row['dead_units']} / {row['total_units']}",
        _fmt(row["mean_inactive_fraction"], ".3f"),
        _fmt(row["train_time_s"], ".1f"),
        _fmt(row["speedup_vs_tanh"], ".2f", suffix="x"),
    ]


def _headers(target_error: float) -> list[str]:
    return [h.format(target=f"{target_error:.0%} train err") for h in _HEADERS]


def format_text_table(rows: Sequence[dict], target_error: float) -> str:
    """The comparison as an aligned plain-text table, for the terminal."""
    table = [_headers(target_error)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]
    # Names left-aligned, numbers right-aligned, as in any table of results.
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows: Sequence[dict], target_error: float) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| " + " | ".join(_headers(target_error)) + " |",
        "|---|" + "---:|" * (len(_HEADERS) - 1),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def describe_speedups(rows: Sequence[dict], target_error: float) -> str:
    """A sentence or two on epochs-to-target against tanh, next to the paper's six-fold."""
    baseline = next((r for r in rows if r["activation"] == BASELINE), None)
    paper = (
        "Krizhevsky et al. (2012, Fig. 1) report ReLU reaching 25% training error on CIFAR-10 "
        "six times faster than tanh."
    )
    if baseline is None:
        return f"No speed-up: {BASELINE} was not among the activations. {paper}"
    if baseline["epochs_to_target"] is None:
        return (
            f"No speed-up: {BASELINE} did not reach {target_error:.0%} training error in "
            f"{baseline['epochs']} epochs. {paper}"
        )
    parts = []
    for row in rows:
        if row["activation"] == BASELINE:
            continue
        if row["speedup_vs_tanh"] is None:
            parts.append(f"{row['activation']} did not reach it in {row['epochs']} epochs")
        else:
            parts.append(
                f"{row['activation']} took {row['epochs_to_target']} "
                f"({row['speedup_vs_tanh']:.2f}x faster)"
            )
    others = ("; " + "; ".join(parts)) if parts else ""
    return (
        f"Epochs to {target_error:.0%} training error: {BASELINE} took "
        f"{baseline['epochs_to_target']}{others}. {paper}"
    )


def write_comparison(
    runs: Sequence[ActivationRun],
    rows: Sequence[dict],
    target_error: float,
    out_dir: Path,
    base_config: dict | None = None,
) -> None:
    """Write compare.json, compare.md and compare.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {
        run.activation: {
            "epoch": [r["epoch"] for r in run.history],
            "train_error": [r.get("train_error") for r in run.history],
            "val_accuracy": [r.get("val_accuracy") for r in run.history],
        }
        for run in runs
    }
    document = {
        "target_error": target_error,
        "baseline": BASELINE,
        "base_config": base_config,
        "rows": list(rows),
        "curves": curves,
    }
    (out_dir / COMPARE_JSON).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    lines = ["# Activation comparison", ""]
    if base_config:
        shown = ("arch", "data", "limit", "epochs", "batch_size", "optimizer", "lr", "seed")
        setup = ", ".join(f"{k}={base_config[k]}" for k in shown if k in base_config)
        lines += [f"Same architecture, data, seed and budget for every activation: {setup}.", ""]
    lines += [format_markdown_table(rows, target_error), "", describe_speedups(rows, target_error)]
    if any(r["activation"] in SATURATING_KINDS for r in rows):
        # SPEC defines activity as y > 0 for every kind, which reads differently for these two.
        lines += [
            "",
            "Inactive and dead use the same rule for every activation (active: y > 0), so "
            "sigmoid is never inactive, and a tanh channel counts as dead when its output is "
            "negative everywhere, not when it has stopped learning; their run reports give the "
            "saturated fraction, the measure that fits them.",
        ]
    runs_with_dirs = [r for r in rows if r["run_dir"]]
    if runs_with_dirs:
        lines += ["", "Run reports:", ""]
        for r in runs_with_dirs:
            link = f"{_relative(Path(r['run_dir']), out_dir)}/report.md"
            lines.append(f"- {r['activation']}: [{r['run_dir']}]({link})")
    lines += ["", f"![Training error and held-out accuracy per activation]({COMPARE_PNG})", ""]
    (out_dir / COMPARE_MD).write_text("\n".join(lines), encoding="utf-8")
    plot_comparison(runs, target_error, out_dir / COMPARE_PNG)


def plot_comparison(runs: Sequence[ActivationRun], target_error: float, path: Path) -> None:
    """Training error (with the target dashed) and held-out accuracy per activation, as a PNG."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_err, ax_acc = fig.subplots(1, 2)
    colors = colormaps["tab10"]
    for i, run in enumerate(runs):
        epochs = [r["epoch"] for r in run.history]
        marker = "o" if len(epochs) <= 20 else None
        kw = {"color": colors(i % 10), "marker": marker, "markersize": 4, "label": run.activation}
        ax_err.plot(epochs, [_nan(r.get("train_error")) for r in run.history], **kw)
        ax_acc.plot(epochs, [_nan(r.get("val_accuracy")) for r in run.history], **kw)
    ax_err.axhline(target_error, color="grey", linestyle="--", label=f"target {target_error:g}")
    ax_err.set(title="Training error", xlabel="epoch", ylabel="error rate")
    ax_err.set_ylim(bottom=0)
    ax_acc.set(title="Held-out accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_err, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _base_name(base: TrainConfig) -> str:
    # Each activation's run is <name>-<activation>, so a default name must not name one.
    return base.name or f"{base.arch}-{base.data}"


def _is_main_process() -> bool:
    # Under torchrun every rank runs compare; only rank 0 has the held-out metrics and writes.
    return int(os.environ.get("RANK", "0")) == 0


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"
