"""Multi-process training through torchrun (DDP over gloo on CPU)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path):
    cmd = [
        sys.executable,
        *["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        *["-m", "training", "train", "--epochs", "2", "--limit", "400"],
        *["--batch-size", "32", "--threads", "1"],
        "--no-progress",
        "--out",
        str(tmp_path),
        "--name",
        "ddp",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone writes
    assert records[-1]["val_accuracy"] > 0.3
    assert done.stdout.count("run folder:") == 1
