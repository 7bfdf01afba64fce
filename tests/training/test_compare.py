"""Tests of training/compare.py: the table from synthetic histories, the CLI, a real run (slow)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from training.compare import (
    ActivationRun,
    add_compare_args,
    build_rows,
    compare,
    describe_speedups,
    format_markdown_table,
    format_text_table,
    main_compare,
    parse_activations,
    validate_activations,
    write_comparison,
)
from training.config import TrainConfig, add_train_args

# Training error per epoch: relu reaches 25% at epoch 2, tanh at 6, sigmoid never (in 6).
ERRORS = {
    "relu": [0.40, 0.24, 0.15, 0.10, 0.08, 0.06],
    "tanh": [0.70, 0.55, 0.45, 0.35, 0.28, 0.25],
    "sigmoid": [0.90, 0.89, 0.88, 0.80, 0.70, 0.60],
}


def make_history(activation: str, dead_last: int = 0) -> list[dict]:
    """A synthetic metrics.jsonl history with two activation layers (8 and 16 channels)."""
    history = []
    for i, error in enumerate(ERRORS[activation]):
        history.append(
            {
                "epoch": i + 1,
                "train_loss": error * 2,
                "train_error": error,
                "val_loss": error * 2.2,
                "val_accuracy": 1 - error - 0.02 + (0.05 if i == 3 else 0.0),
                "elapsed_s": 2.0 * (i + 1),
                "layers": {
                    "a.act": {"kind": activation, "channels": 8, "inactive_fraction": 0.4,
                              "dead_units": 1 if dead_last else 0, "grad_norm": 0.1},
                    "b.act": {"kind": activation, "channels": 16, "inactive_fraction": 0.6,
                              "dead_units": max(dead_last - 1, 0), "grad_norm": 0.2},
                },
            }
        )  # fmt: skip
    return history


def make_runs(*activations: str) -> list[ActivationRun]:
    return [
        ActivationRun(a, make_history(a, dead_last=3 if a == "relu" else 0), 12.0 + i)
        for i, a in enumerate(activations)
    ]


def test_build_rows_epochs_to_target_and_speedup() -> None:
    rows = build_rows(make_runs("relu", "tanh", "sigmoid"), target_error=0.25)

    by_name = {r["activation"]: r for r in rows}
    assert [r["activation"] for r in rows] == ["relu", "tanh", "sigmoid"]
    assert by_name["relu"]["epochs_to_target"] == 2
    assert by_name["tanh"]["epochs_to_target"] == 6
    assert by_name["sigmoid"]["epochs_to_target"] is None
    assert by_name["relu"]["speedup_vs_tanh"] == pytest.approx(3.0)
    assert by_name["tanh"]["speedup_vs_tanh"] == pytest.approx(1.0)
    assert by_name["sigmoid"]["speedup_vs_tanh"] is None
    assert by_name["sigmoid"]["epochs"] == 6


def test_build_rows_accuracy_units_and_time() -> None:
    (relu,) = build_rows(make_runs("relu"), target_error=0.25)

    assert relu["final_val_accuracy"] == pytest.approx(1 - 0.06 - 0.02)
    # Epoch 4 carries a +0.05 bump: 1 - 0.10 - 0.02 + 0.05 beats the final 0.92.
    assert relu["best_val_accuracy"] == pytest.approx(0.93)
    assert relu["dead_units"] == 3  # 1 + 2 over the two layers
    assert relu["total_units"] == 24
    assert relu["mean_inactive_fraction"] == pytest.approx(0.5)
    assert relu["train_time_s"] == 12.0
    assert relu["speedup_vs_tanh"] is None  # no tanh run


def test_no_speedup_when_tanh_never_reaches_target() -> None:
    rows = build_rows(make_runs("relu", "tanh"), target_error=0.2)

    assert rows[0]["epochs_to_target"] == 3
    assert rows[1]["epochs_to_target"] is None
    assert all(r["speedup_vs_tanh"] is None for r in rows)
    assert "tanh did not reach 20% training error in 6 epochs" in describe_speedups(rows, 0.2)


def test_tables_show_not_reached_and_speedup() -> None:
    rows = build_rows(make_runs("relu", "tanh", "sigmoid"), target_error=0.25)

    text = format_text_table(rows, 0.25)
    markdown = format_markdown_table(rows, 0.25)

    lines = text.splitlines()
    assert "epochs to 25% train err" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1  # aligned columns
    relu_line = next(line for line in lines if line.startswith("relu"))
    assert relu_line.split()[-1] == "3.00x"
    assert "3 / 24" in relu_line
    assert "not reached in 6" in text
    assert (
        "| sigmoid | 0.3800 | 0.3800 | not reached in 6 | 0 / 24 | 0.500 | 14.0 | – |" in markdown
    )
    assert "| tanh | 0.7300 | 0.7300 | 6 | 0 / 24 | 0.500 | 13.0 | 1.00x |" in markdown
    assert markdown.splitlines()[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"


def test_describe_speedups_cites_the_paper() -> None:
    rows = build_rows(make_runs("relu", "tanh", "sigmoid"), target_error=0.25)

    text = describe_speedups(rows, 0.25)

    assert "tanh took 6; relu took 2 (3.00x faster); sigmoid did not reach it in 6 epochs" in text
    assert "Krizhevsky et al. (2012" in text
    assert "tanh was not among" in describe_speedups(rows[:1], 0.25)


def test_write_comparison_files(tmp_path: Path) -> None:
    runs = make_runs("relu", "tanh")
    rows = build_rows(runs, target_error=0.25)

    write_comparison(runs, rows, 0.25, tmp_path / "cmp", base_config={"arch": "small_cnn"})

    document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert document["target_error"] == 0.25
    assert document["rows"] == rows
    assert document["curves"]["tanh"]["train_error"] == ERRORS["tanh"]
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "arch=small_cnn" in markdown
    assert "| relu |" in markdown
    assert "![Training error and held-out accuracy per activation](compare.png)" in markdown
    png = tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_parse_activations() -> None:
    assert parse_activations("relu, tanh,sigmoid") == ["relu", "tanh", "sigmoid"]
    assert validate_activations(["leaky_relu", "elu"]) == ["leaky_relu", "elu"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("relu,swish", "unknown activation(s) 'swish'; choose from relu, leaky_relu, prelu"),
        ("", "no activations given; choose from relu"),
        ("relu,tanh,relu", "listed twice: relu"),
    ],
)
def test_parse_activations_errors(text: str, message: str) -> None:
    with pytest.raises(
        argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_activations(text)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training compare")
    add_train_args(parser)
    add_compare_args(parser)
    return parser


def test_cli_rejects_unknown_activation_naming_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--activations", "relu,gelu"])

    err = capsys.readouterr().err
    assert "--activations" in err
    assert "'gelu'" in err
    assert "relu, leaky_relu, prelu, elu, relu6, sigmoid, tanh" in err


def test_add_compare_args_alone_defines_target_error() -> None:
    parser = argparse.ArgumentParser()
    add_compare_args(parser)

    args = parser.parse_args(["--target-error", "0.1", "--compare-out", "x"])

    assert args.target_error == 0.1
    assert args.compare_out == Path("x")
    assert args.activations == ["relu", "tanh", "sigmoid"]


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """Replace run_training with one that returns synthetic histories; record the configs."""
    seen: list[TrainConfig] = []

    def run_training(cfg: TrainConfig) -> SimpleNamespace:
        seen.append(cfg)
        run_dir = Path(cfg.out) / cfg.name
        run_dir.mkdir(parents=True)
        history = make_history(cfg.activation)
        return SimpleNamespace(
            run_dir=run_dir,
            history=history,
            final_val_accuracy=history[-1]["val_accuracy"],
            train_time_s=history[-1]["elapsed_s"],
        )

    monkeypatch.setattr("training.compare.run_training", run_training)
    return seen


def test_compare_varies_only_the_activation(
    fake_training: list[TrainConfig], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = TrainConfig(out=str(tmp_path / "runs"), name="exp", seed=7, epochs=6, lr=0.01)

    rows = compare(base, ["relu", "tanh"], 0.25, tmp_path / "cmp")

    assert [c.activation for c in fake_training] == ["relu", "tanh"]
    assert [c.name for c in fake_training] == ["exp-relu", "exp-tanh"]
    for cfg in fake_training:
        changed = {
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(cfg, f.name) != getattr(base, f.name)
        }
        # base.activation is relu, so the relu run differs from base in name and target only.
        assert changed <= {"activation", "name", "target_error"}
        assert cfg.target_error == 0.25
    assert [r["speedup_vs_tanh"] for r in rows] == [pytest.approx(3.0), pytest.approx(1.0)]
    assert rows[0]["run_dir"] == str(tmp_path / "runs" / "exp-relu")
    out = capsys.readouterr().out
    assert "[1/2] training small_cnn with relu" in out
    assert "3.00x" in out
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {
        "compare.json",
        "compare.md",
        "compare.png",
    }
    assert "(../runs/exp-relu/report.md)" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_checks_arguments_before_training(
    fake_training: list[TrainConfig], tmp_path: Path
) -> None:
    base = TrainConfig(out=str(tmp_path))

    with pytest.raises(ValueError, match="unknown activation"):
        compare(base, ["relu", "softplus"], 0.25, tmp_path)
    with pytest.raises(ValueError, match="between 0 and 1"):
        compare(base, ["relu"], 1.5, tmp_path)
    with pytest.raises(ValueError, match="drop --resume"):
        compare(dataclasses.replace(base, resume="x.pt"), ["relu"], 0.25, tmp_path)
    assert fake_training == []


def test_main_compare_defaults(
    fake_training: list[TrainConfig], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = make_parser().parse_args(
        ["--out", str(tmp_path), "--activations", "relu,sigmoid", "--epochs", "6"]
    )

    assert main_compare(args) == 0

    # No --name: runs are <arch>-<data>-<activation>; no --target-error: 25%, as in the paper.
    assert [c.name for c in fake_training] == ["small_cnn-digits-relu", "small_cnn-digits-sigmoid"]
    assert all(c.target_error == 0.25 for c in fake_training)
    document = json.loads((tmp_path / "small_cnn-digits-compare" / "compare.json").read_text())
    assert document["target_error"] == 0.25
    assert "not reached in 6" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_real_training_on_digits(tmp_path: Path) -> None:
    base = TrainConfig(
        data="digits",
        arch="small_cnn",
        epochs=2,
        batch_size=32,
        limit=256,
        stats_samples=128,
        out=str(tmp_path / "runs"),
        name="e2e",
        progress=False,
        threads=2,
    )

    rows = compare(base, ["relu", "tanh", "sigmoid"], 0.5, tmp_path / "cmp")

    assert [r["activation"] for r in rows] == ["relu", "tanh", "sigmoid"]
    for row in rows:
        assert row["epochs"] == 2
        assert 0.0 <= row["final_val_accuracy"] <= 1.0
        assert row["total_units"] > 0
        assert 0 <= row["dead_units"] <= row["total_units"]
        assert row["train_time_s"] > 0
        run_dir = Path(row["run_dir"])
        assert (run_dir / "report.md").is_file()
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert document["rows"] == rows
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_main_compare_takes_the_cli_config(
    fake_training: list[TrainConfig], tmp_path: Path
) -> None:
    # training/__main__.py builds the config once and passes it along.
    args = make_parser().parse_args(["--activations", "relu", "--compare-out", str(tmp_path / "c")])
    base = TrainConfig(out=str(tmp_path / "runs"), name="cli", epochs=6)

    assert main_compare(args, base) == 0

    assert [c.name for c in fake_training] == ["cli-relu"]
    assert (tmp_path / "c" / "compare.md").is_file()
