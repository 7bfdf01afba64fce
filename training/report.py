"""The report of one run folder: loss and accuracy curves, per-layer plots, a Markdown summary.

Input is what ``training.train`` leaves in the run folder: ``config.json``, ``metrics.jsonl``
(one record per epoch, with a ``layers`` dict in network order) and, when the run finished,
``summary.json``. Output is ``curves.png``, ``layers.png`` and ``report.md`` beside them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

# The object-oriented Figure API renders through Agg without pyplot: no global backend to
# set (this runs headless and inside other programs), and no figure registry that leaks
# memory when many reports are written in one process.
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from service.metadata import SATURATING_KINDS

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CURVES_PNG = "curves.png"
LAYERS_PNG = "layers.png"
REPORT_MD = "report.md"

# A first layer whose gradient norm is below this share of the last layer's is flagged as
# vanishing. He-initialised ReLU nets keep per-layer gradient scale roughly constant (He et
# al. 2015); measured here on digits, VGG with ReLU ends at 0.37x, VGG with sigmoid, which
# never trains, at 0.0013x (`python -m training compare --arch vgg --no-batch-norm ...`).
VANISHING_RATIO = 1e-2

# Config fields shown on the report's config line, in this order; the rest are in config.json.
_CONFIG_LINE_FIELDS = (
    "arch",
    "activation",
    "negative_slope",
    "init",
    "batch_norm",
    "data",
    "limit",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "augment",
    "seed",
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` in a run folder, in file order."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def epochs_to_error(history: Sequence[dict], target: float) -> int | None:
    """The first epoch whose training error is at most ``target``, or None if none is."""
    for record in history:
        error = record.get("train_error")
        if error is not None and error <= target:
            return int(record["epoch"])
    return None


def layer_names(history: Sequence[dict]) -> list[str]:
    """Activation layer names over all epochs, in network order (first-seen order)."""
    # dicts keep insertion order, and metrics.jsonl keeps the layers in network order.
    names: dict[str, None] = {}
    for record in history:
        names.update(dict.fromkeys(record.get("layers", {})))
    return list(names)


def write_report(run_dir: str | Path, target_error: float | None = None) -> Path:
    """Write ``curves.png``, ``layers.png`` and ``report.md`` into a run folder; return the .md."""
    run_dir = Path(run_dir)
    history = read_metrics(run_dir)
    if not history:
        raise ValueError(f"{run_dir / METRICS_FILE} has no epochs to report")
    config = _read_optional_json(run_dir / CONFIG_FILE)
    summary = _read_optional_json(run_dir / SUMMARY_FILE)
    if target_error is None:
        # A run trained with --target-error records it; report against the same target.
        target_error = summary.get("target_error") or config.get("target_error")

    plot_curves(history, run_dir / CURVES_PNG, target_error=target_error)
    plot_layers(history, run_dir / LAYERS_PNG)
    path = run_dir / REPORT_MD
    path.write_text(
        format_report(history, config, summary, target_error, title=run_dir.name),
        encoding="utf-8",
    )
    return path


def plot_curves(history: Sequence[dict], path: Path, target_error: float | None = None) -> None:
    """Loss (train and held-out) and error (train and held-out) against epoch, as a PNG."""
    epochs = [r["epoch"] for r in history]
    marker = _marker(len(epochs))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_err = fig.subplots(1, 2)

    ax_loss.plot(epochs, _series(history, "train_loss"), marker=marker, label="train")
    ax_loss.plot(epochs, _series(history, "val_loss"), marker=marker, label="held-out")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")

    # Error rather than accuracy on both curves, so the training error can be read against
    # the target (Krizhevsky et al. 2012, Fig. 1 plots training error the same way).
    val_error = [
        _nan_if_none(None if a is None else 1.0 - a) for a in _raw(history, "val_accuracy")
    ]
    ax_err.plot(epochs, _series(history, "train_error"), marker=marker, label="train error")
    ax_err.plot(epochs, val_error, marker=marker, label="held-out error (1 - accuracy)")
    if target_error is not None:
        ax_err.axhline(target_error, color="grey", linestyle="--", label=f"target {target_error:g}")
    ax_err.set(title="Error", xlabel="epoch", ylabel="error rate")
    ax_err.set_ylim(bottom=0)

    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_layers(history: Sequence[dict], path: Path) -> None:
    """Per-layer inactive fraction, dead units and gradient norm (log) against epoch, as a PNG."""
    names = layer_names(history)
    epochs = [r["epoch"] for r in history]
    marker = _marker(len(epochs))
    # A sequential colormap runs from the first layer to the last, so depth reads from colour
    # even where 19 lines (ResNet-20) cross and the legend is too far to look up each one.
    cmap = colormaps["viridis"]
    colors = [cmap(i / max(len(names) - 1, 1) * 0.9) for i in range(len(names))]

    fig = Figure(figsize=(10, 10), layout="constrained")
    ax_inactive, ax_dead, ax_grad = fig.subplots(3, 1, sharex=True)
    any_grad = False
    for name, color in zip(names, colors, strict=True):
        kw = {"color": color, "marker": marker, "markersize": 3, "linewidth": 1.2}
        ax_inactive.plot(
            epochs, _layer_series(history, name, "inactive_fraction"), label=name, **kw
        )
        ax_dead.plot(epochs, _layer_series(history, name, "dead_units"), **kw)
        # A log axis cannot show zero or missing norms; they become gaps, not -inf.
        grads = [g if g > 0 else math.nan for g in _layer_series(history, name, "grad_norm")]
        any_grad |= any(not math.isnan(g) for g in grads)
        ax_grad.plot(epochs, grads, **kw)

    ax_inactive.set(title="Inactive fraction (held-out)", ylabel="share of elements")
    ax_inactive.set_ylim(-0.02, 1.02)
    ax_dead.set(title="Dead units (held-out)", ylabel="channels")
    ax_dead.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dead.set_ylim(bottom=0)
    ax_grad.set(title="Gradient norm of the layer's weights", ylabel="L2 norm", xlabel="epoch")
    if any_grad:
        ax_grad.set_yscale("log")
    for ax in (ax_inactive, ax_dead, ax_grad):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # One legend for all three panels, outside them, in a small font and more columns when
    # the net is deep, so it never covers the curves.
    fig.legend(
        loc="outside right center",
        fontsize="x-small" if len(names) > 10 else "small",
        ncols=1 if len(names) <= 24 else 2,
        title="layer",
        title_fontsize="small",
    )
    fig.savefig(path, dpi=100)


def format_report(
    history: Sequence[dict],
    config: dict,
    summary: dict,
    target_error: float | None,
    title: str = "run",
) -> str:
    """The Markdown text of report.md for a run's history, config and (possibly empty) summary."""
    last = history[-1]
    name = config.get("name") or title
    lines = [f"# Training report: {name}", ""]
    if config:
        shown = ", ".join(f"{k}={config[k]}" for k in _CONFIG_LINE_FIELDS if k in config)
        lines += [f"**Config:** {shown} (all fields in [{CONFIG_FILE}]({CONFIG_FILE}))", ""]

    accuracies = [
        (r["epoch"], r["val_accuracy"]) for r in history if r.get("val_accuracy") is not None
    ]
    if accuracies:
        final_epoch, final_acc = accuracies[-1]
        best_epoch, best_acc = max(accuracies, key=lambda ea: ea[1])
        lines.append(f"- Final held-out accuracy: {final_acc:.4f} (epoch {final_epoch})")
        lines.append(f"- Best held-out accuracy: {best_acc:.4f} (epoch {best_epoch})")
    lines.append(f"- Epochs recorded: {len(history)}")
    if summary.get("held_out"):
        counts = ""
        if summary.get("train_samples") is not None:
            counts = (
                f"; {summary['train_samples']} training, "
                f"{summary.get('held_out_samples')} held-out samples"
            )
        lines.append(f"- Held-out data: {summary['held_out']}{counts}")
    if target_error is not None:
        reached = epochs_to_error(history, target_error)
        text = f"epoch {reached}" if reached is not None else f"not reached in {len(history)}"
        lines.append(f"- Epochs to {target_error:.1%} training error: {text}")
    train_time = summary.get("train_time_s", last.get("elapsed_s"))
    if train_time is not None:
        lines.append(f"- Training time: {train_time:.1f} s")
    if summary.get("parameters") is not None:
        lines.append(f"- Parameters: {summary['parameters']:,}")
    lines.append("")

    layers = last.get("layers", {})
    if layers:
        lines += [f"## Activation layers at epoch {last['epoch']} (held-out data)", ""]
        lines += format_layer_table(layers)
        lines.append("")
    lines += ["## Findings", ""]
    lines += [f"- {finding}" for finding in find_problems(history)] or [
        "- No dead units and no vanishing gradients at the last epoch."
    ]
    lines += [
        "",
        "## Plots",
        "",
        f"![Loss and error curves]({CURVES_PNG})",
        "",
        f"![Per-layer inactive fraction, dead units and gradient norm]({LAYERS_PNG})",
        "",
    ]
    return "\n".join(lines)


def format_layer_table(layers: dict[str, dict]) -> list[str]:
    """Markdown table rows of one epoch's per-layer statistics."""
    saturating = any(s.get("saturated_fraction") is not None for s in layers.values())
    header = "| layer | kind | channels | inactive fraction | dead units | grad norm |"
    rule = "|---|---|---:|---:|---:|---:|"
    if saturating:
        header += " saturated fraction |"
        rule += "---:|"
    rows = [header, rule]
    for name, s in layers.items():
        row = (
            f"| {name} | {s.get('kind', '')} | {_fmt(s.get('channels'), 'd')} "
            f"| {_fmt(s.get('inactive_fraction'), '.3f')} | {_fmt(s.get('dead_units'), 'd')} "
            f"| {_fmt(s.get('grad_norm'), '.3g')} |"
        )
        if saturating:
            row += f" {_fmt(s.get('saturated_fraction'), '.3f')} |"
        rows.append(row)
    return rows


def find_problems(history: Sequence[dict]) -> list[str]:
    """Sentences flagging dead units and vanishing gradients at the last epoch (empty if none)."""
    first_layers = history[0].get("layers", {})
    layers = history[-1].get("layers", {})
    problems = []
    # Dead (never y > 0) is the dying-ReLU symptom; a tanh channel that is negative everywhere
    # still passes gradient, and sigmoid is never "dead", so only the ReLU family is flagged.
    dead = [
        (n, s)
        for n, s in layers.items()
        if (s.get("dead_units") or 0) > 0 and s.get("kind") not in SATURATING_KINDS
    ]
    if dead:
        total = sum(s["dead_units"] for _, s in dead)
        parts = []
        for name, s in dead:
            part = f"{name} {s['dead_units']} of {s.get('channels', '?')}"
            before = first_layers.get(name, {}).get("dead_units")
            if before is not None and before != s["dead_units"] and len(history) > 1:
                part += f" (was {before} at epoch {history[0]['epoch']})"
            parts.append(part)
        problems.append(
            f"**Dead units:** {total} channel(s) never activate on held-out data: "
            + "; ".join(parts)
            + "."
        )

    # First and last layers that report a gradient norm (None: the layer has no weights).
    norms = [(n, s["grad_norm"]) for n, s in layers.items() if s.get("grad_norm") is not None]
    if len(norms) >= 2:
        (first, g_first), (last, g_last) = norms[0], norms[-1]
        if g_last > 0 and g_first < VANISHING_RATIO * g_last:
            problems.append(
                f"**Vanishing gradients:** the gradient norm of the first layer ({first}, "
                f"{g_first:.3g}) is below {VANISHING_RATIO:g} x that of the last ({last}, "
                f"{g_last:.3g})."
            )
    return problems


def _read_optional_json(path: Path) -> dict:
    """A JSON object from a file that may be absent (a run still going has no summary)."""
    if not path.exists():
        return {}
    loaded: dict = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def _marker(n_epochs: int) -> str | None:
    # A one-epoch line is invisible without markers; with many epochs markers only clutter.
    return "o" if n_epochs <= 20 else None


def _raw(history: Sequence[dict], key: str) -> list:
    return [r.get(key) for r in history]


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _series(history: Sequence[dict], key: str) -> list[float]:
    # NaN leaves a gap in the line where an epoch lacks the value, instead of failing.
    return [_nan_if_none(v) for v in _raw(history, key)]


def _layer_series(history: Sequence[dict], name: str, key: str) -> list[float]:
    return [_nan_if_none(r.get("layers", {}).get(name, {}).get(key)) for r in history]


def _fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
