"""Training runs: the run folder, per-epoch evidence, determinism, resume."""

import json

import pytest

from tests.training.conftest import quick_config
from training.train import CHECKPOINT, load_checkpoint, run_training

TIMING_KEYS = {"epoch_time_s", "elapsed_s"}


def _without_timings(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_run_folder_holds_config_metrics_checkpoint_and_report(trained_run):
    run_dir = trained_run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == "small_cnn"
    assert config["epochs"] == 3
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for record in lines:
        assert 0 <= record["train_error"] <= 1
        assert 0 <= record["val_accuracy"] <= 1
        layers = record["layers"]
        assert list(layers) == [
            "features.0.act",
            "features.1.act",
            "features.3.act",
            "features.4.act",
            "classifier.3",
        ]
        for layer in layers.values():
            assert 0 <= layer["inactive_fraction"] <= 1
            assert 0 <= layer["dead_units"] <= layer["channels"]
            assert layer["grad_norm"] > 0
    assert lines[-1]["val_accuracy"] > 0.5  # it learned something in three short epochs
    state = load_checkpoint(run_dir)
    assert state["epoch"] == 3
    assert state["data"]["labels"] == [str(i) for i in range(10)]
    for name in ("report.md", "curves.png", "layers.png", "summary.json"):
        assert (run_dir / name).stat().st_size > 0


def test_same_seed_gives_identical_metrics(tmp_path):
    first = run_training(quick_config(tmp_path / "a"))
    second = run_training(quick_config(tmp_path / "b"))
    assert _without_timings(first.history) == _without_timings(second.history)
    third = run_training(quick_config(tmp_path / "c", seed=1))
    assert _without_timings(third.history) != _without_timings(first.history)


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tmp_path):
    full = run_training(quick_config(tmp_path / "full", epochs=3, schedule="none"))
    partial = run_training(quick_config(tmp_path / "part", epochs=1, schedule="none"))
    resumed = run_training(
        quick_config(tmp_path / "part", epochs=3, resume=str(partial.run_dir / CHECKPOINT))
    )
    assert _without_timings(resumed.history) == _without_timings(full.history)
    lines = (partial.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_refuses_a_different_budget_under_a_planned_schedule(tmp_path):
    run = run_training(quick_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="cannot change epochs from 1 to 4"):
        run_training(quick_config(tmp_path, epochs=4, resume=str(run.run_dir)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; choose one of adam, adamw, sgd"),
        ({"schedule": "step"}, "unknown schedule 'step'; choose one of onecycle"),
        ({"activation": "gelu"}, "unknown activation 'gelu'; choose one of relu"),
        ({"epochs": 0}, "epochs must be at least 1"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_training(quick_config(tmp_path, **overrides))
    assert not any(tmp_path.iterdir())
