"""Training time per epoch: digits (8x8) and 28x28 MNIST-format data, small CNN.

    python bench/bench_train.py [--idx DIR] [--epochs 3] [--repeats 3] [--out FILE.json]

Without --idx, the 28x28 case uses a stand-in: IDX files of scikit-learn's digits upscaled to
28x28 and randomly shifted, 8,000 to train and 2,000 held out, the sizes of the issue's
MNIST check (no real MNIST can be downloaded here). Each configuration is trained
``--repeats`` times, interleaved; the table gives the median seconds per epoch (training
plus the held-out evaluation and per-layer statistics that every epoch records).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from training.config import TrainConfig
from training.data import write_idx
from training.train import run_training


def make_28x28_idx(folder: Path, n_train: int = 8000, n_test: int = 2000, seed: int = 0) -> Path:
    """MNIST-format IDX files from digits: upscaled to 20x20, placed at random in 28x28."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    # Train and held-out images come from disjoint digits, so nothing leaks between them.
    order = rng.permutation(len(digits.target))
    cut = len(order) * n_train // n
    pick = np.concatenate([rng.choice(order[:cut], n_train), rng.choice(order[cut:], n_test)])
    small = torch.from_numpy(digits.images[pick] / 16.0).float().unsqueeze(1)  # (N, 1, 8, 8)
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    canvas = np.zeros((n, 28, 28), dtype=np.uint8)
    offsets = rng.integers(2, 7, (n, 2))  # MNIST centres a 20x20 box in 28x28, give or take
    pixels = (big.squeeze(1).clamp(0, 1).numpy() * 255).astype(np.uint8)
    for i, (dy, dx) in enumerate(offsets):
        canvas[i, dy : dy + 20, dx : dx + 20] = pixels[i]
    labels = digits.target[pick].astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", canvas[:n_train])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:n_train])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", canvas[n_train:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[n_train:])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idx", type=Path, help="folder of real MNIST-format IDX files")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        idx = args.idx or make_28x28_idx(Path(tmp) / "idx28")
        cases = {
            "digits 8x8 (1,438 train)": {"data": "digits"},
            f"idx 28x28 ({'given' if args.idx else 'stand-in'})": {
                "data": "idx",
                "data_path": str(idx),
            },
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        accuracy: dict[str, list[float]] = {name: [] for name in cases}
        for repeat in range(args.repeats):
            for name, data in cases.items():  # interleaved: drift in machine load hits all
                cfg = TrainConfig(
                    **data, epochs=args.epochs, out=tmp, name=f"r{repeat}", progress=False
                )
                t0 = time.perf_counter()
                result = run_training(cfg)
                times[name].append((time.perf_counter() - t0) / args.epochs)
                accuracy[name].append(result.final_val_accuracy)
    rows = []
    print(f"{'data':32} {'median s/epoch':>15} {'min':>7} {'max':>7} {'held-out acc':>13}")
    for name in cases:
        row = {
            "data": name,
            "median_s_per_epoch": statistics.median(times[name]),
            "runs_s_per_epoch": times[name],
            "epochs": args.epochs,
            "final_val_accuracy": statistics.median(accuracy[name]),
        }
        rows.append(row)
        print(
            f"{name:32} {row['median_s_per_epoch']:15.2f} {min(times[name]):7.2f} "
            f"{max(times[name]):7.2f} {row['final_val_accuracy']:13.4f}"
        )
    ratio = rows[1]["median_s_per_epoch"] / rows[0]["median_s_per_epoch"]
    print(f"28x28 / digits epoch time: {ratio:.1f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
