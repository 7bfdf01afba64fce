"""Data sets for training: digits, MNIST-format IDX files, image folders, CIFAR-10 batches.

Every loader returns float32 images in [0, 1] shaped (N, C, H, W) and int64 labels, plus a
held-out split that is either the data set's own test files or a stratified, seeded split.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

DATA_KINDS = ("digits", "idx", "folder", "cifar10")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"), big-endian data.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, H, W)
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)
_GZIP_MAGIC = b"\x1f\x8b"

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(ValueError):
    """A data set that cannot be read; the message is one line naming the problem."""


@dataclass
class DataBundle:
    """Train and held-out tensors of one data set, with its class names and provenance."""

    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor  # (M, C, H, W) float32 in [0, 1], held out
    val_y: torch.Tensor  # (M,) int64
    labels: list[str]  # class names, index = class id
    source: str  # e.g. "digits", "idx:/path"
    held_out: str  # how the held-out split was made, human-readable

    @property
    def channels(self) -> int:
        """Number of image channels (1 or 3)."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image (height, width)."""
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        """Number of classes, including any with no samples."""
        return len(self.labels)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of train_x (std floored at 1e-3)."""
        # Population std; the floor keeps normalisation finite on a constant channel.
        std, mean = torch.std_mean(self.train_x, dim=(0, 2, 3), correction=0)  # (C,), (C,)
        return [float(m) for m in mean], [max(float(s), 1e-3) for s in std]


def load_data(
    kind: str,
    path: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> DataBundle:
    """Load a data set of `kind` (one of DATA_KINDS) with a held-out split."""
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data kind {kind!r}; valid choices: {', '.join(DATA_KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if min(image_size) < 1:
            raise DataError(f"image_size must be two positive integers, got {image_size}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")

    if kind == "digits":
        bundle = _load_digits(val_fraction, seed)
    else:
        if path is None:
            raise DataError(f"data kind {kind!r} needs a path")
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"data path {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {root} is not a folder")
        try:
            if kind == "idx":
                bundle = _load_idx(root, val_fraction, seed)
            elif kind == "folder":
                # Folders decode images one by one: they resize, convert and limit as they read.
                return _load_folder(root, val_fraction, seed, image_size, channels, limit)
            else:
                bundle = _load_cifar10(root, val_fraction, seed)
        except PermissionError as e:
            raise DataError(f"data path {root} is not readable: {e}") from None

    if limit is not None and limit < len(bundle.train_y):
        keep = _limit_indices(len(bundle.train_y), limit, seed)
        bundle.train_x, bundle.train_y = bundle.train_x[keep], bundle.train_y[keep]
    bundle.train_x = _convert(bundle.train_x, channels, image_size)
    bundle.val_x = _convert(bundle.val_x, channels, image_size)
    return bundle


# ---------------------------------------------------------------------------------------------
# IDX files


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzip-compressed if the path ends with .gz."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        names = ", ".join(str(d.newbyteorder("=")) for d in _IDX_DTYPES.values())
        raise DataError(f"IDX cannot store dtype {array.dtype}; valid choices: {names}")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[codes[native]]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, into an array of its native dtype."""
    return _read_idx_with_magic(path)[1]


def _read_idx_with_magic(path: str | os.PathLike[str]) -> tuple[int, np.ndarray]:
    """The magic number and the array of an IDX file; DataError naming the file if corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is too short for a header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"IDX file {path} has a bad magic number 0x{magic:08x}")
    data_start = 4 + 4 * ndim
    if len(raw) < data_start:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - data_start
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {problem}: dims {list(shape)} need {expected} data bytes, "
            f"found {actual}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=data_start).reshape(shape)
    return magic, array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _find_idx(root: Path, name: str) -> Path | None:
    """The file `name` or `name.gz` in root, preferring the uncompressed one (faster)."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_checked(path: Path, expected_magic: int) -> np.ndarray:
    """read_idx, checking the magic number is the one MNIST uses for this kind of file."""
    magic, array = _read_idx_with_magic(path)
    if magic != expected_magic:
        raise DataError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    return array


def _read_idx_pair(root: Path, prefix: str, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) of `prefix` (train or t10k), validated."""
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        name = "images-idx3-ubyte" if images_path is None else "labels-idx1-ubyte"
        raise DataError(f"IDX folder {root} has no {prefix}-{name} (or {prefix}-{name}.gz)")
    images = _read_idx_checked(images_path, _IDX_IMAGES_MAGIC)  # (N, H, W) uint8
    labels = _read_idx_checked(labels_path, _IDX_LABELS_MAGIC)  # (N,) uint8
    if len(images) != len(labels):
        raise DataError(
            f"IDX files {images_path.name} and {labels_path.name} disagree: "
            f"{len(images)} images but {len(labels)} labels"
        )
    if len(labels) and labels.max() >= num_labels:
        raise DataError(
            f"IDX file {labels_path} has label {int(labels.max())}, out of range for "
            f"{num_labels} classes (add a labels.txt with one class name per line)"
        )
    return images, labels


def _load_idx(root: Path, val_fraction: float, seed: int) -> DataBundle:
    """MNIST-format folder: train-* files, and t10k-* files as held-out when present."""
    labels_txt = root / "labels.txt"
    if labels_txt.is_file():
        names = [line.strip() for line in labels_txt.read_text().splitlines() if line.strip()]
        if not names:
            raise DataError(f"{labels_txt} has no class names")
    else:
        names = [str(i) for i in range(10)]

    train_images, train_labels = _read_idx_pair(root, "train", len(names))
    has_test = [
        _find_idx(root, f"t10k-{n}-idx{d}-ubyte") for n, d in (("images", 3), ("labels", 1))
    ]
    if any(has_test):
        test_images, test_labels = _read_idx_pair(root, "t10k", len(names))
        if test_images.shape[1:] != train_images.shape[1:]:
            raise DataError(
                f"IDX folder {root}: t10k images are {test_images.shape[1:]}, "
                f"train images {train_images.shape[1:]}"
            )
        # _read_idx_pair found both files (it raises naming the missing one)
        held_out = "test files " + ", ".join(p.name for p in has_test if p is not None)
    else:
        train_idx, val_idx = _stratified_split(train_labels, val_fraction, seed, root)
        test_images, test_labels = train_images[val_idx], train_labels[val_idx]
        train_images, train_labels = train_images[train_idx], train_labels[train_idx]
        held_out = _split_description(val_fraction, seed)
    return DataBundle(
        train_x=_to_float(train_images[:, None]),  # (N, 1, H, W)
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        val_x=_to_float(test_images[:, None]),
        val_y=torch.from_numpy(test_labels.astype(np.int64)),
        labels=names,
        source=f"idx:{root}",
        held_out=held_out,
    )


# ---------------------------------------------------------------------------------------------
# digits, CIFAR-10


def _load_digits(val_fraction: float, seed: int) -> DataBundle:
    """scikit-learn's 8x8 digits (values 0..16), split stratified."""
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    targets = digits.target.astype(np.int64)  # (1797,)
    train_idx, val_idx = _stratified_split(targets, val_fraction, seed, "digits")
    return DataBundle(
        train_x=torch.from_numpy(images[train_idx]),
        train_y=torch.from_numpy(targets[train_idx]),
        val_x=torch.from_numpy(images[val_idx]),
        val_y=torch.from_numpy(targets[val_idx]),
        labels=[str(i) for i in range(10)],
        source="digits",
        held_out=_split_description(val_fraction, seed),
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else.

    A pickle can run arbitrary code when loaded; CIFAR batches only need these globals.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles from numpy < 2, as CIFAR ships
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        """The global `module.name` if allowed, else UnpicklingError."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """One CIFAR pickle (written by Python 2, hence bytes keys) as a dict."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"cannot read CIFAR-10 file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 file {path} holds a {type(obj).__name__}, not a dict")
    return obj


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 batch."""
    batch = _unpickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 file {path} lacks b'data' or b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR-10 file {path} has data {data.dtype}{list(data.shape)}, expected uint8[N, 3072]"
        )
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR-10 file {path} has {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise DataError(
            f"CIFAR-10 file {path} has label {bad}, out of range for {num_classes} classes"
        )
    # Each row is the R plane, then G, then B, each 32x32 row-major: a plain reshape is NCHW.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path, val_fraction: float, seed: int) -> DataBundle:
    """CIFAR-10 python batches: data_batch_1..5 for training, test_batch held out."""
    if (root / _CIFAR_DIR).is_dir():  # accept the folder the archive extracts into, too
        root = root / _CIFAR_DIR
    meta_path = root / "batches.meta"
    if not meta_path.is_file():
        raise DataError(f"CIFAR-10 folder {root} has no batches.meta")
    meta = _unpickle(meta_path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if not names:
        raise DataError(f"CIFAR-10 file {meta_path} has no b'label_names'")

    present = [root / name for name in _CIFAR_TRAIN_BATCHES if (root / name).is_file()]
    if not present:
        raise DataError(f"CIFAR-10 folder {root} has none of {', '.join(_CIFAR_TRAIN_BATCHES)}")
    batches = [_read_cifar_batch(p, len(names)) for p in present]
    train_images = np.concatenate([b[0] for b in batches])  # (N, 3, 32, 32) uint8
    train_labels = np.concatenate([b[1] for b in batches])  # (N,)
    if (root / "test_batch").is_file():
        test_images, test_labels = _read_cifar_batch(root / "test_batch", len(names))
        held_out = "test file test_batch"
    else:
        train_idx, val_idx = _stratified_split(train_labels, val_fraction, seed, root)
        test_images, test_labels = train_images[val_idx], train_labels[val_idx]
        train_images, train_labels = train_images[train_idx], train_labels[train_idx]
        held_out = _split_description(val_fraction, seed)
    if len(present) < len(_CIFAR_TRAIN_BATCHES):
        held_out += f" (training on {', '.join(p.name for p in present)} only)"
    return DataBundle(
        train_x=_to_float(train_images),
        train_y=torch.from_numpy(train_labels),
        val_x=_to_float(test_images),
        val_y=torch.from_numpy(test_labels),
        labels=names,
        source=f"cifar10:{root}",
        held_out=held_out,
    )


# ---------------------------------------------------------------------------------------------
# Image folders


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(folder: Path) -> list[Path]:
    """Sub-folders of `folder` that name classes (hidden ones skipped), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _collect(folder: Path, names: list[str]) -> tuple[list[Path], np.ndarray]:
    """Image paths under folder/<class>/ and their class ids."""
    files: list[Path] = []
    ids: list[int] = []
    for class_id, name in enumerate(names):
        if (folder / name).is_dir():
            found = _list_images(folder / name)
            files += found
            ids += [class_id] * len(found)
    return files, np.asarray(ids, dtype=np.int64)


def _load_folder(
    root: Path,
    val_fraction: float,
    seed: int,
    image_size: tuple[int, int] | None,
    channels: int | None,
    limit: int | None,
) -> DataBundle:
    """Folder of images, one sub-folder per class; optional train/ and val/ (or test/)."""
    train_root = root / "train"
    val_root = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_root.is_dir():
        train_root, val_root = root, None
    class_dirs = _class_dirs(train_root)
    if not class_dirs:
        raise DataError(
            f"image folder {train_root} has no class sub-folders "
            f"(expected {train_root}/<class>/*.png)"
        )
    names = [d.name for d in class_dirs]
    for d in class_dirs:
        if not _list_images(d):
            raise DataError(
                f"class folder {d} has no images (valid extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
    train_files, train_ids = _collect(train_root, names)

    if val_root is not None:
        unknown = sorted({d.name for d in _class_dirs(val_root)} - set(names))
        if unknown:
            raise DataError(
                f"held-out folder {val_root} has classes {unknown} that {train_root} lacks; "
                f"valid classes: {', '.join(names)}"
            )
        val_files, val_ids = _collect(val_root, names)
        if not val_files:
            raise DataError(f"held-out folder {val_root} has no images in class sub-folders")
        held_out = f"folder {val_root.name}/"
    else:
        train_idx, val_idx = _stratified_split(train_ids, val_fraction, seed, root)
        val_files, val_ids = [train_files[i] for i in val_idx], train_ids[val_idx]
        train_files, train_ids = [train_files[i] for i in train_idx], train_ids[train_idx]
        held_out = _split_description(val_fraction, seed)
    if limit is not None and limit < len(train_files):
        keep = _limit_indices(len(train_files), limit, seed)
        train_files, train_ids = [train_files[i] for i in keep], train_ids[keep]

    # Read headers first (cheap: Pillow decodes pixels lazily) to settle size and channels.
    modes = []
    for i, file in enumerate(train_files + val_files):
        try:
            with Image.open(file) as img:
                modes.append(img.mode)
                if i == 0 and image_size is None:
                    image_size = (img.height, img.width)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"image {file} does not decode: {e}") from None
    if channels is None:
        channels = 1 if all(m in ("1", "L", "LA") for m in modes) else 3
    assert image_size is not None

    return DataBundle(
        train_x=_read_images(train_files, channels, image_size),
        train_y=torch.from_numpy(train_ids),
        val_x=_read_images(val_files, channels, image_size),
        val_y=torch.from_numpy(val_ids),
        labels=names,
        source=f"folder:{root}",
        held_out=held_out,
    )


def _read_images(files: Sequence[Path], channels: int, image_size: tuple[int, int]) -> torch.Tensor:
    """Decode, convert and resize image files into (N, C, H, W) float32 in [0, 1]."""
    height, width = image_size
    out = np.empty((len(files), height, width, channels), dtype=np.uint8)  # (N, H, W, C)
    mode = "L" if channels == 1 else "RGB"
    for i, file in enumerate(files):
        try:
            with Image.open(file) as opened:
                img = opened.convert(mode)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                out[i] = np.asarray(img).reshape(height, width, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"image {file} does not decode: {e}") from None
    return _to_float(out.transpose(0, 3, 1, 2))  # (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def _stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, what: object
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): round(val_fraction * n) of each class, chosen with `seed`.

    Every class with two or more samples keeps at least one on each side.
    """
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        # A class of one sample stays in train: it cannot be on both sides.
        n_val = int(round(len(members) * val_fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        val_parts.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, np.int64)
    if len(val_idx) == 0:
        raise DataError(
            f"{what}: too few samples to hold out {val_fraction * 100:g}% "
            f"(each class needs at least 2; got {len(labels)} samples)"
        )
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_idx] = True
    return np.flatnonzero(~is_val), val_idx


def _split_description(val_fraction: float, seed: int) -> str:
    """held_out text for a stratified split of the training set."""
    return f"stratified {val_fraction * 100:g}% of train, seed {seed}"


def _limit_indices(n: int, limit: int, seed: int) -> np.ndarray:
    """The first `limit` of a seeded permutation of range(n), in ascending order."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _convert(
    x: torch.Tensor, channels: int | None, image_size: tuple[int, int] | None
) -> torch.Tensor:
    """Convert (N, C, H, W) images to `channels` and resize to `image_size`, bilinear."""
    if channels is not None and channels != x.shape[1]:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W), gray copied to R, G, B
        else:
            # ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    if image_size is not None and tuple(x.shape[2:]) != image_size and len(x):
        # antialias=True matches Pillow's bilinear when shrinking.
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    return x
