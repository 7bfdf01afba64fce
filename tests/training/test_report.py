"""Tests of training/report.py on synthetic run folders (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from training.report import epochs_to_error, read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_ERRORS = [0.60, 0.40, 0.22, 0.15, 0.10]
VAL_ACCURACIES = [0.50, 0.70, 0.85, 0.90, 0.88]
DEAD_GROWING = [0, 0, 1, 2, 3]


def make_history(first_grad: float = 0.05) -> list[dict]:
    """Five epochs, three layers: a healthy ReLU, a ReLU losing units, a sigmoid."""
    history = []
    for i in range(5):
        history.append(
            {
                "epoch": i + 1,
                "train_loss": 2.0 / (i + 1),
                "train_error": TRAIN_ERRORS[i],
                "val_loss": 2.2 / (i + 1),
                "val_accuracy": VAL_ACCURACIES[i],
                "lr": 0.001,
                "epoch_time_s": 1.5,
                "elapsed_s": 1.5 * (i + 1),
                "layers": {
                    "features.0.act": {
                        "kind": "relu",
                        "channels": 8,
                        "inactive_fraction": 0.5,
                        "dead_units": 0,
                        "grad_norm": first_grad,
                        "saturated_fraction": None,
                        "mean": 0.3,
                        "std": 0.6,
                    },
                    "features.3.act": {
                        "kind": "relu",
                        "channels": 16,
                        "inactive_fraction": 0.55 + 0.025 * i,
                        "dead_units": DEAD_GROWING[i],
                        "grad_norm": 0.0123,
                        "saturated_fraction": None,
                        "mean": 0.2,
                        "std": 0.5,
                    },
                    "classifier.1.act": {
                        "kind": "sigmoid",
                        "channels": 32,
                        "inactive_fraction": 0.0,
                        "dead_units": 0,
                        "grad_norm": 0.2,
                        "saturated_fraction": 0.1 * i,
                        "mean": 0.5,
                        "std": 0.2,
                    },
                },
            }
        )
    return history


def write_run(run_dir: Path, history: list[dict], summary: dict | None = None) -> Path:
    """A run folder as train.py leaves it: config.json, metrics.jsonl, maybe summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"name": "cnn-relu", "arch": "small_cnn", "activation": "relu", "data": "digits"}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", make_history())


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One report written for the module (plots take ~0.5 s each), and its report.md text."""
    run_dir = write_run(tmp_path_factory.mktemp("report") / "run", make_history())
    path = write_report(run_dir, target_error=0.25)
    assert path == run_dir / "report.md"
    return run_dir, path.read_text()


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100
        assert image.height > 100


def test_write_report_creates_pngs_and_markdown(reported_run: tuple[Path, str]) -> None:
    run_dir, text = reported_run

    assert_png(run_dir / "curves.png")
    assert_png(run_dir / "layers.png")
    assert "# Training report: cnn-relu" in text
    assert "arch=small_cnn, activation=relu" in text
    assert "](curves.png)" in text
    assert "](layers.png)" in text


def test_report_numbers_and_layer_table(reported_run: tuple[Path, str]) -> None:
    _, text = reported_run

    assert "- Final held-out accuracy: 0.8800 (epoch 5)" in text
    assert "- Best held-out accuracy: 0.9000 (epoch 4)" in text
    # 0.22 at epoch 3 is the first training error at or below 25%.
    assert "- Epochs to 25.0% training error: epoch 3" in text
    assert "## Activation layers at epoch 5" in text
    assert (
        "| layer | kind | channels | inactive fraction | dead units | grad norm | saturated" in text
    )
    assert "| features.0.act | relu | 8 | 0.500 | 0 | 0.05 | – |" in text
    assert "| features.3.act | relu | 16 | 0.650 | 3 | 0.0123 | – |" in text
    assert "| classifier.1.act | sigmoid | 32 | 0.000 | 0 | 0.2 | 0.400 |" in text


def test_report_flags_dead_units_with_their_growth(reported_run: tuple[Path, str]) -> None:
    _, text = reported_run

    assert "**Dead units:** 3 channel(s)" in text
    assert "features.3.act 3 of 16 (was 0 at epoch 1)" in text
    assert "Vanishing gradients" not in text


def test_report_does_not_flag_tanh_channels_as_dead(tmp_path: Path) -> None:
    # Under the y > 0 rule a tanh channel negative everywhere counts as dead; it still learns.
    history = make_history()
    for record in history:
        record["layers"]["features.3.act"]["dead_units"] = 0
        record["layers"]["classifier.1.act"].update(kind="tanh", dead_units=4)
    run_dir = write_run(tmp_path / "run", history)

    text = write_report(run_dir).read_text()

    assert "| classifier.1.act | tanh | 32 | 0.000 | 4 |" in text
    assert "**Dead units:**" not in text


def test_report_flags_vanishing_gradients(tmp_path: Path) -> None:
    # First layer 1e-5 against the last layer's 0.2: below the 1e-2 ratio.
    run_dir = write_run(tmp_path / "run", make_history(first_grad=1e-5))

    text = write_report(run_dir).read_text()

    assert "**Vanishing gradients:**" in text
    assert "(features.0.act, 1e-05)" in text
    assert "(classifier.1.act, 0.2)" in text


def test_report_without_problems_says_so(tmp_path: Path) -> None:
    history = make_history()
    for record in history:
        record["layers"]["features.3.act"]["dead_units"] = 0
    run_dir = write_run(tmp_path / "run", history)

    text = write_report(run_dir).read_text()

    assert "No dead units and no vanishing gradients" in text
    assert "**Dead units:**" not in text


def test_report_target_from_summary_and_not_reached(tmp_path: Path) -> None:
    summary = {"target_error": 0.05, "train_time_s": 7.25, "parameters": 12345}
    run_dir = write_run(tmp_path / "run", make_history(), summary=summary)

    text = write_report(run_dir).read_text()

    assert "- Epochs to 5.0% training error: not reached in 5" in text
    assert "- Training time: 7.2 s" in text
    assert "- Parameters: 12,345" in text


def test_report_for_resnet20_depth(tmp_path: Path) -> None:
    # 19 activation layers (ResNet-20): the legend must not break the figure.
    history = make_history()
    template = history[0]["layers"]["features.3.act"]
    for record in history:
        record["layers"] = {f"layer{i // 6 + 1}.{i % 6}.act": dict(template) for i in range(19)}
    run_dir = write_run(tmp_path / "run", history)

    write_report(run_dir)

    assert_png(run_dir / "layers.png")
    assert (run_dir / "report.md").read_text().count("| relu | 16 |") == 19


def test_write_report_without_epochs_is_an_error(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [])

    with pytest.raises(ValueError, match="no epochs"):
        write_report(run_dir)


def test_read_metrics_skips_blank_lines(run_dir: Path) -> None:
    path = run_dir / "metrics.jsonl"
    path.write_text("\n" + path.read_text().replace("\n", "\n\n"))

    history = read_metrics(run_dir)

    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[2]["layers"]["features.3.act"]["dead_units"] == 1


def test_read_metrics_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Line 2 is blank, so the broken record is on line 3.
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n\n{"epoch": 2,\n')

    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: malformed JSON"):
        read_metrics(run_dir)


def test_read_metrics_rejects_non_objects(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2]\n')

    with pytest.raises(ValueError, match="line 2: expected a JSON object, got list"):
        read_metrics(run_dir)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.25, 3), (0.22, 3), (0.6, 1), (0.1, 5), (0.05, None)],
)
def test_epochs_to_error(target: float, expected: int | None) -> None:
    assert epochs_to_error(make_history(), target) == expected


def test_epochs_to_error_uses_epoch_numbers_not_positions() -> None:
    # A resumed run's history may start later than epoch 1.
    history = [{"epoch": 4, "train_error": 0.5}, {"epoch": 5, "train_error": 0.2}]

    assert epochs_to_error(history, 0.25) == 5
    assert epochs_to_error([], 0.25) is None
