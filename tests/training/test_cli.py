"""The command line: a real training + export run, and bad input answered with one line."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.__main__ import main
from training.data import write_idx


def _idx_folder(root, n=40, labels=None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    labels = labels if labels is not None else np.arange(n, dtype=np.uint8) % 10
    write_idx(root / "train-labels-idx1-ubyte", labels)
    return root


def _corrupt_header(root):
    _idx_folder(root)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    return root


def _undecodable_image(root):
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / label / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


BAD_INPUTS = {
    "missing data path": (lambda t: ["--data", "idx", "--data-path", str(t / "nope")], "nope"),
    "corrupt IDX header": (
        lambda t: ["--data", "idx", "--data-path", str(_corrupt_header(t / "d"))],
        "train-images-idx3-ubyte",
    ),
    "labels do not match images": (
        lambda t: [
            "--data",
            "idx",
            "--data-path",
            str(_idx_folder(t / "d", labels=np.zeros(39, dtype=np.uint8))),
        ],
        "39",
    ),
    "image that does not decode": (
        lambda t: ["--data", "folder", "--data-path", str(_undecodable_image(t / "d"))],
        "broken.png",
    ),
    "unknown data kind": (lambda t: ["--data", "svhn"], "digits, idx, folder, cifar10"),
    "unknown architecture": (lambda t: ["--arch", "alexnet"], "resnet20, small_cnn, vgg"),
    "unknown activation": (lambda t: ["--activation", "swish"], "relu, leaky_relu, prelu"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_error_and_nothing_exported(case, tmp_path, capsys):
    make_args, expected = BAD_INPUTS[case]
    models = tmp_path / "models"
    args = [
        "train",
        *make_args(tmp_path),
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--export",
        "m",
        "--model-root",
        str(models),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: ")
    assert expected in err[0]
    assert not models.exists()


def test_export_of_an_existing_version_fails_before_training(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "m" / "1").mkdir(parents=True)
    (models / "m" / "1" / "model.onnx").write_bytes(b"keep me")
    args = [
        "train",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--export",
        "m",
        "--version",
        "1",
        "--model-root",
        str(models),
    ]
    assert main(args) == 2
    assert "exists; pass overwrite" in capsys.readouterr().err
    assert (models / "m" / "1" / "model.onnx").read_bytes() == b"keep me"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_train_and_export_from_the_command_line(tmp_path):
    models = tmp_path / "models"
    cmd = [
        sys.executable,
        *["-m", "training", "train", "--epochs", "2", "--limit", "400", "--no-progress"],
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "cli",
        "--export",
        "digits",
        "--model-root",
        str(models),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "exported:" in done.stdout
    assert (models / "digits" / "1" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "cli" / "report.md").is_file()


def test_help_lists_the_subcommands():
    done = subprocess.run(
        [sys.executable, "-m", "training", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "compare", "export", "download"):
        assert command in done.stdout


@pytest.mark.slow
def test_28x28_idx_files_train_and_export(tmp_path):
    import onnx

    from service.metadata import ModelMetadata

    rng = np.random.default_rng(1)
    data = tmp_path / "idx"
    data.mkdir()
    labels = np.arange(300, dtype=np.uint8) % 10
    images = np.zeros((300, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):  # a bright bar whose height is the class (no shifts)
        images[i, 4 + 2 * label : 6 + 2 * label, 4:24] = 255
    images = np.maximum(images, rng.integers(0, 40, images.shape, dtype=np.uint8))
    for prefix, part in (("train", slice(0, 240)), ("t10k", slice(240, 300))):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images[part])
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    models = tmp_path / "models"
    args = [
        "train",
        "--data",
        "idx",
        "--data-path",
        str(data),
        "--epochs",
        "4",
        "--no-augment",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--export",
        "bars",
        "--model-root",
        str(models),
    ]
    assert main(args) == 0
    proto = onnx.load(str(models / "bars" / "1" / "model.onnx"))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert (meta.preprocessing.height, meta.preprocessing.width) == (28, 28)
    assert meta.training["held_out"].startswith("test files")
    assert meta.training["held_out_samples"] == 60
    assert meta.training["onnx_accuracy"] > 0.9
