"""Tests for training/data.py: every loader on small fixtures written in the real formats."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DATA_KINDS, DataBundle, DataError, load_data, read_idx, write_idx

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def check_bundle(bundle: DataBundle, channels: int, size: tuple[int, int]) -> None:
    """The invariants every loader promises."""
    for x, y in ((bundle.train_x, bundle.train_y), (bundle.val_x, bundle.val_y)):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.shape == (len(y), channels, *size)
        assert float(x.min()) >= 0.0
        assert float(x.max()) <= 1.0
        assert int(y.min()) >= 0
        assert int(y.max()) < bundle.num_classes
    assert bundle.channels == channels
    assert bundle.image_size == size


# ---------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


def test_digits_split_is_stratified(digits: DataBundle) -> None:
    check_bundle(digits, 1, (8, 8))
    assert len(digits.train_y) + len(digits.val_y) == 1797
    assert 0.19 < len(digits.val_y) / 1797 < 0.21
    assert digits.labels == [str(i) for i in range(10)]
    assert digits.source == "digits"
    assert digits.held_out == "stratified 20% of train, seed 0"
    # Each class is held out in the same proportion.
    total = torch.bincount(digits.train_y, minlength=10) + torch.bincount(
        digits.val_y, minlength=10
    )
    share = torch.bincount(digits.val_y, minlength=10) / total
    assert float(share.min()) > 0.18
    assert float(share.max()) < 0.22
    # 0..16 divided by 16: the brightest pixel is exactly 1.
    assert float(digits.train_x.max()) == 1.0


def test_digits_split_is_deterministic(digits: DataBundle) -> None:
    again = load_data("digits")
    assert torch.equal(again.val_x, digits.val_x)
    assert torch.equal(again.val_y, digits.val_y)
    other = load_data("digits", seed=1, val_fraction=0.5)
    assert not torch.equal(other.val_y[:359], digits.val_y)
    assert abs(len(other.val_y) - 1797 / 2) <= 10
    assert other.held_out == "stratified 50% of train, seed 1"


def test_mean_std_and_limit_and_conversion(digits: DataBundle) -> None:
    mean, std = digits.mean_std()
    assert len(mean) == len(std) == 1
    assert mean[0] == pytest.approx(float(digits.train_x.mean()), abs=1e-5)
    assert std[0] == pytest.approx(float(digits.train_x.std()), abs=1e-3)
    constant = DataBundle(
        torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64), torch.zeros(1, 3, 2, 2),
        torch.zeros(1, dtype=torch.int64), ["a"], "test", "none",
    )  # fmt: skip
    assert constant.mean_std() == ([0.0] * 3, [1e-3] * 3)

    small = load_data("digits", limit=50, image_size=(16, 12), channels=3)
    check_bundle(small, 3, (16, 12))
    assert len(small.train_y) == 50
    assert len(small.val_y) == len(digits.val_y)  # limit bounds training samples only
    # Gray expanded to RGB: three equal planes.
    assert torch.equal(small.train_x[:, 0], small.train_x[:, 2])
    assert torch.equal(load_data("digits", limit=50).train_y, load_data("digits", limit=50).train_y)


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_write_idx_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _digits_28() -> tuple[np.ndarray, np.ndarray]:
    """The digits images upsampled to 28x28 uint8, as MNIST stores them, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images[:, None] / 16.0).float()  # (1797, 1, 8, 8)
    big = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear")
    return (big[:, 0] * 255).round().clamp(0, 255).numpy().astype(np.uint8), d.target


@pytest.fixture(scope="module")
def mnist_like() -> tuple[np.ndarray, np.ndarray]:
    return _digits_28()


def make_idx_folder(
    folder: Path, images: np.ndarray, labels: np.ndarray, *, test: bool, gz: bool
) -> Path:
    """An MNIST-style folder: 300 training samples, and 100 t10k samples if `test`."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", images[:300])
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", labels[:300].astype(np.uint8))
    if test:
        write_idx(folder / f"t10k-images-idx3-ubyte{ext}", images[300:400])
        write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", labels[300:400].astype(np.uint8))
    return folder


def test_idx_folder_with_test_files(tmp_path: Path, mnist_like) -> None:
    images, labels = mnist_like
    folder = make_idx_folder(tmp_path / "mnist", images, labels, test=True, gz=True)
    bundle = load_data("idx", folder)
    check_bundle(bundle, 1, (28, 28))
    assert (len(bundle.train_y), len(bundle.val_y)) == (300, 100)
    assert bundle.held_out == "test files t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    assert bundle.source == f"idx:{folder}"
    assert bundle.labels == [str(i) for i in range(10)]
    np.testing.assert_allclose(bundle.val_x[:, 0].numpy(), images[300:400] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(bundle.val_y.numpy(), labels[300:400])


def test_idx_folder_split_and_labels_txt(tmp_path: Path, mnist_like) -> None:
    images, labels = mnist_like
    keep = labels < 5  # five classes, to match the five names below
    folder = make_idx_folder(tmp_path / "f", images[keep], labels[keep], test=False, gz=False)
    (folder / "labels.txt").write_text("\n".join(FASHION_NAMES) + "\n")
    bundle = load_data("idx", folder, val_fraction=0.25, seed=3)
    check_bundle(bundle, 1, (28, 28))
    assert bundle.labels == FASHION_NAMES
    assert (len(bundle.train_y), len(bundle.val_y)) == (225, 75)
    assert bundle.held_out == "stratified 25% of train, seed 3"
    assert set(bundle.val_y.tolist()) == set(range(5))


def _corrupt(folder: Path, problem: str) -> str:
    """Damage one file of an IDX folder; return a regex the error message must match."""
    images_path = folder / "train-images-idx3-ubyte"
    labels_path = folder / "train-labels-idx1-ubyte"
    raw = images_path.read_bytes()
    if problem == "bad magic":
        images_path.write_bytes(b"\xde\xad\xbe\xef" + raw[4:])
        return r"train-images-idx3-ubyte has a bad magic number 0xdeadbeef"
    if problem == "labels where images belong":
        images_path.write_bytes(labels_path.read_bytes())
        return r"train-images-idx3-ubyte has magic number 0x00000801, expected 0x00000803"
    if problem == "truncated data":
        images_path.write_bytes(raw[:-100])
        return r"train-images-idx3-ubyte is truncated: dims \[300, 28, 28\] need 235200"
    if problem == "truncated header":
        images_path.write_bytes(raw[:9])
        return r"train-images-idx3-ubyte is truncated inside its header"
    if problem == "count mismatch":
        write_idx(labels_path, np.zeros(299, dtype=np.uint8))
        return r"300 images but 299 labels"
    if problem == "label out of range":
        write_idx(labels_path, np.full(300, 10, dtype=np.uint8))
        return r"train-labels-idx1-ubyte has label 10, out of range for 10 classes"
    if problem == "missing labels":
        labels_path.unlink()
        return r"has no train-labels-idx1-ubyte"
    if problem == "half a test pair":
        write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
        return r"has no t10k-labels-idx1-ubyte"
    raise AssertionError(problem)


@pytest.mark.parametrize(
    "problem",
    [
        "bad magic",
        "labels where images belong",
        "truncated data",
        "truncated header",
        "count mismatch",
        "label out of range",
        "missing labels",
        "half a test pair",
    ],
)
def test_idx_folder_errors(tmp_path: Path, mnist_like, problem: str) -> None:
    images, labels = mnist_like
    folder = make_idx_folder(tmp_path, images, labels, test=False, gz=False)
    pattern = _corrupt(folder, problem)
    with pytest.raises(DataError, match=pattern) as info:
        load_data("idx", folder)
    assert "\n" not in str(info.value)


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    write_idx(path, np.zeros(1000, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cannot read IDX file .*x-idx1-ubyte\.gz"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_gray_folder(root: Path, per_class: int = 5) -> Path:
    """Two classes of 10x12 (h x w) grayscale PNGs: 'dark' is 0, 'light' is 255."""
    for i in range(per_class):
        _write_image(root / "dark" / f"{i}.png", np.zeros((10, 12), np.uint8))
        _write_image(root / "light" / f"{i}.PNG", np.full((10, 12), 255, np.uint8))
    (root / "light" / "notes.txt").write_text("not an image, ignored")
    return root


def test_folder_gray_split(tmp_path: Path) -> None:
    root = make_gray_folder(tmp_path / "gray")
    bundle = load_data("folder", root)
    check_bundle(bundle, 1, (10, 12))
    assert bundle.labels == ["dark", "light"]
    assert (len(bundle.train_y), len(bundle.val_y)) == (8, 2)
    assert sorted(bundle.val_y.tolist()) == [0, 1]  # stratified: one of each
    assert bundle.held_out == "stratified 20% of train, seed 0"
    # Class 0 images are black, class 1 white: pixels follow labels.
    means = bundle.train_x.mean(dim=(1, 2, 3))
    assert torch.equal(means, bundle.train_y.float())


def test_folder_colour_train_val_layout_resizes(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((20, 24, 3), np.uint8)  # blue/0.jpg comes first: its size is the default
    blue[..., 2] = 255
    for split, n, ext in (("train", 3, "png"), ("val", 1, "bmp")):
        for i in range(n):
            _write_image(root / split / "red" / f"{i}.{ext}", red)
            _write_image(root / split / "blue" / f"{i}.jpg", blue)
    bundle = load_data("folder", root)
    check_bundle(bundle, 3, (20, 24))  # red images upsampled from 16x16
    assert bundle.labels == ["blue", "red"]
    assert (len(bundle.train_y), len(bundle.val_y)) == (6, 2)
    assert bundle.held_out == "folder val/"
    is_red = bundle.train_y == 1
    assert float(bundle.train_x[is_red][:, 0].min()) == 1.0
    assert float(bundle.train_x[is_red][:, 1:].max()) == 0.0
    # JPEG is lossy: blue stays blue, nearly.
    assert float(bundle.train_x[~is_red][:, 2].mean()) > 0.9
    assert float(bundle.train_x[~is_red][:, 0].mean()) < 0.1

    # Asked-for size and channels override the defaults; test/ works like val/.
    (root / "val").rename(root / "test")
    gray = load_data("folder", root, image_size=(8, 4), channels=1, limit=4)
    check_bundle(gray, 1, (8, 4))
    assert len(gray.train_y) == 4
    assert gray.held_out == "folder test/"


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty has no class sub-folders"):
        load_data("folder", empty)

    (empty / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cat has no images"):
        load_data("folder", empty)

    root = make_gray_folder(tmp_path / "broken")
    (root / "dark" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"image .*dark/3\.png does not decode"):
        load_data("folder", root)

    # A header that parses but pixel data that stops halfway.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    _write_image(root / "dark" / "3.png", noise)
    (root / "dark" / "3.png").write_bytes((root / "dark" / "3.png").read_bytes()[:2000])
    with pytest.raises(DataError, match=r"image .*dark/3\.png does not decode"):
        load_data("folder", root)

    single = make_gray_folder(tmp_path / "single", per_class=1)
    with pytest.raises(DataError, match=r"too few samples to hold out"):
        load_data("folder", single)


# ---------------------------------------------------------------------------------------------
# CIFAR-10

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]


def _pickle(path: Path, obj: object) -> None:
    # Protocol 2, as the real files (written by Python 2) use.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar_folder(root: Path, batches: int = 2, test: bool = True) -> Path:
    """A cifar-10-batches-py folder of small batches in the real format.

    Class c's images have plane c % 3 at 255 and the others at 0 (class 0: pure red).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR_NAMES]})

    def batch(n: int, offset: int) -> dict:
        labels = [(offset + i) % len(CIFAR_NAMES) for i in range(n)]
        data = np.zeros((n, 3, 32 * 32), np.uint8)
        data[np.arange(n), [y % 3 for y in labels]] = 255
        return {b"batch_label": b"fake", b"labels": labels, b"data": data.reshape(n, 3072)}

    for i in range(1, batches + 1):
        _pickle(folder / f"data_batch_{i}", batch(10, i))
    if test:
        _pickle(folder / "test_batch", batch(5, 0))
    return folder


def test_cifar10_planes_and_labels(tmp_path: Path) -> None:
    folder = make_cifar_folder(tmp_path)
    bundle = load_data("cifar10", folder)
    check_bundle(bundle, 3, (32, 32))
    assert bundle.labels == CIFAR_NAMES
    assert (len(bundle.train_y), len(bundle.val_y)) == (20, 5)
    assert bundle.held_out.startswith("test file test_batch")
    assert "data_batch_1, data_batch_2 only" in bundle.held_out
    for x, y in ((bundle.train_x, bundle.train_y), (bundle.val_x, bundle.val_y)):
        red = x[y == 0]  # (n, 3, 32, 32)
        assert len(red) > 0
        assert bool((red[:, 0] == 1).all())
        assert bool((red[:, 1:] == 0).all())
        green = x[y == 1]  # class 1: the G plane
        assert bool((green[:, 1] == 1).all())
        assert float(green[:, [0, 2]].max()) == 0.0
    # The parent folder, as the archive extracts, works too.
    assert load_data("cifar10", tmp_path).source == f"cifar10:{folder}"


def test_cifar10_without_test_batch_splits(tmp_path: Path) -> None:
    folder = make_cifar_folder(tmp_path, batches=5, test=False)
    bundle = load_data("cifar10", folder, val_fraction=0.2)
    assert (len(bundle.train_y), len(bundle.val_y)) == (40, 10)
    assert bundle.held_out == "stratified 20% of train, seed 0"


def test_cifar10_errors(tmp_path: Path) -> None:
    folder = make_cifar_folder(tmp_path, batches=1)
    (folder / "data_batch_1").unlink()
    with pytest.raises(DataError, match=r"has none of data_batch_1, data_batch_2"):
        load_data("cifar10", folder)

    _pickle(folder / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"data_batch_1 has data uint8\[2, 100\], expected"):
        load_data("cifar10", folder)

    # A pickle that would run code when loaded is refused, not executed.
    (folder / "data_batch_1").write_bytes(pickle.dumps(gzip.GzipFile))
    with pytest.raises(DataError, match=r"data_batch_1.*not allowed"):
        load_data("cifar10", folder)

    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"has no batches\.meta"):
        load_data("cifar10", folder)


# ---------------------------------------------------------------------------------------------
# Arguments


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(DataError, match=r"unknown data kind 'mnist'; valid choices: ") as info:
        load_data("mnist", "/tmp")
    assert all(kind in str(info.value) for kind in DATA_KINDS)


@pytest.mark.parametrize("kind", ["idx", "folder", "cifar10"])
def test_missing_path(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DataError, match=r"data path .*nowhere does not exist"):
        load_data(kind, tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"data kind '{kind}' needs a path"):
        load_data(kind)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
        ({"image_size": (0, 8)}, "image_size must be two positive integers"),
        ({"limit": 0}, "limit must be a positive number"),
    ],
)
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_data("digits", **kwargs)
