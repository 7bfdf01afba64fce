"""Download the public data sets (MNIST, Fashion-MNIST, CIFAR-10), verifying SHA-256 digests.

For machines that have a network; everything else in training/ reads local files only.
Files land in a temporary file next to their destination and are moved into place only
after their digest matches, so an interrupted or corrupted download never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from training.data import DataError

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB
_TIMEOUT_S = 60.0  # per socket operation, not for the whole file


class ChecksumError(DataError):
    """A downloaded file whose SHA-256 digest is not the published one."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to download and the SHA-256 digest it must have."""

    url: str
    filename: str
    sha256: str


def _files(base_url: str, digests: dict[str, str]) -> list[RemoteFile]:
    """RemoteFile entries for files that share one base URL."""
    return [RemoteFile(base_url + name, name, sha) for name, sha in digests.items()]


# Digests as published by TensorFlow Datasets and Keras for these exact files.
# The original MNIST host (yann.lecun.com) often refuses downloads; PyTorch's mirror serves
# byte-identical files.
DATASETS: dict[str, list[RemoteFile]] = {
    "mnist": _files(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
            ),
            "train-labels-idx1-ubyte.gz": (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        },
    ),
    "fashion_mnist": _files(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
            ),
            "train-labels-idx1-ubyte.gz": (
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
            ),
        },
    ),
    "cifar10": _files(
        "https://www.cs.toronto.edu/~kriz/",
        {
            "cifar-10-python.tar.gz": (
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
            ),
        },
    ),
}

# Class names in label order, from https://github.com/zalandoresearch/fashion-mnist#labels
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_CIFAR_DIR = "cifar-10-batches-py"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_url(remote: RemoteFile, base_url: str | None) -> str:
    """The URL to fetch: base_url, when given, replaces everything before the file's name."""
    if base_url is None:
        return remote.url
    name = Path(urllib.parse.urlparse(remote.url).path).name or remote.filename
    return f"{base_url.rstrip('/')}/{name}"


def download_file(
    remote: RemoteFile, dest_dir: Path, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Download `remote` into dest_dir, verify its SHA-256 and return its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.filename
    expected = remote.sha256.lower()
    if final.is_file():
        if sha256_file(final) == expected:
            logger.info("%s is already present with the right SHA-256", final)
            return final
        logger.warning("%s exists with a different SHA-256; downloading it again", final)

    url = _resolve_url(remote, base_url)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{remote.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "relu-serve-training"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=_TIMEOUT_S) as r:
            length = r.headers.get("Content-Length")
            bar = _progress_bar(remote.filename, int(length) if length else None, progress)
            try:
                while chunk := r.read(_CHUNK):
                    digest.update(chunk)  # hash while streaming: no second pass over the file
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(
                f"{remote.filename} from {url} has SHA-256 {actual}, expected {expected}"
            )
        os.replace(tmp, final)
    except urllib.error.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot reach {url}: {e.reason}") from None
    except OSError as e:  # a timeout or reset mid-transfer, or a full disk
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {e}") from None
    except BaseException:  # ChecksumError, Ctrl-C: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        raise
    logger.info("downloaded %s (SHA-256 verified)", final)
    return final


def _progress_bar(name: str, total: int | None, enabled: bool) -> tqdm[NoReturn] | None:
    """A tqdm byte counter when enabled and the size is known, else None."""
    if not enabled or not total:
        return None
    from tqdm import tqdm  # deferred: only needed when a download runs

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


def download_dataset(
    name: str,
    dest_dir: Path,
    *,
    base_url: str | None = None,
    files: list[RemoteFile] | None = None,
    progress: bool = True,
) -> Path:
    """Download data set `name` into dest_dir and return the folder load_data reads.

    `files` replaces the DATASETS entry (other mirrors' files, tests); `name` still decides
    what happens after the download: cifar10 is extracted, fashion_mnist gets labels.txt.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid choices: {', '.join(DATASETS)}")
    dest_dir = Path(dest_dir)
    paths = [
        download_file(remote, dest_dir, base_url=base_url, progress=progress)
        for remote in (files if files is not None else DATASETS[name])
    ]
    if name == "cifar10":
        return _extract_cifar10(paths[0], dest_dir)
    if name == "fashion_mnist":
        (dest_dir / "labels.txt").write_text("\n".join(FASHION_MNIST_LABELS) + "\n")
    return dest_dir


def _extract_cifar10(archive: Path, dest_dir: Path) -> Path:
    """Extract the CIFAR-10 archive once and return its cifar-10-batches-py folder."""
    target = dest_dir / _CIFAR_DIR
    if target.is_dir():
        return target
    # Extract next to the target and rename, so a crash never leaves a half-filled folder.
    staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")  # "data" refuses absolute paths and ..
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot extract {archive}: {e}") from None
        if not (staging / _CIFAR_DIR).is_dir():
            raise DataError(f"archive {archive} has no {_CIFAR_DIR}/ folder")
        os.replace(staging / _CIFAR_DIR, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
