"""Small runs shared by the training tests: digits, a few epochs, a few hundred samples."""

import pytest

from training.config import TrainConfig
from training.train import run_training


def quick_config(tmp_path, **overrides) -> TrainConfig:
    """A run that takes a second or two on two cores."""
    base = {
        "data": "digits",
        "epochs": 2,
        "limit": 300,
        "stats_samples": 100,
        "out": str(tmp_path),
        "name": "run",
        "progress": False,
        "threads": 1,
    }
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished digits run (small CNN, ReLU), shared read-only by export tests."""
    cfg = quick_config(tmp_path_factory.mktemp("runs"), epochs=3, limit=600)
    return run_training(cfg)
