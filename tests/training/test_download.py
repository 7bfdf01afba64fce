"""Tests for training/download.py against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_data import make_cifar_folder
from training.data import DataError, load_data, write_idx
from training.download import (
    DATASETS,
    FASHION_MNIST_LABELS,
    ChecksumError,
    RemoteFile,
    download_dataset,
    download_file,
)

pytestmark = pytest.mark.network


class Server:
    """A static file server on 127.0.0.1 that records the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval: shutdown() waits up to one interval.
        serve = partial(self.httpd.serve_forever, poll_interval=0.02)
        self.thread = threading.Thread(target=serve, daemon=True)

    def publish(self, name: str, data: bytes) -> RemoteFile:
        """Serve `data` as /files/name and describe it with its real digest."""
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return RemoteFile(f"{self.url}/files/{name}", name, hashlib.sha256(data).hexdigest())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "www")
    srv.root.mkdir()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join()


def test_download_verifies_and_skips_when_present(server: Server, tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    remote = server.publish("blob.bin", data)
    dest = tmp_path / "dest"

    path = download_file(remote, dest, progress=True)
    assert path == dest / "blob.bin"
    assert path.read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["blob.bin"]  # no temp file left
    assert server.requests == ["/files/blob.bin"]

    # Present with the right digest: not fetched again.
    assert download_file(remote, dest, progress=False) == path
    assert server.requests == ["/files/blob.bin"]

    # Present but damaged: fetched again and repaired.
    path.write_bytes(b"damaged")
    assert download_file(remote, dest, progress=False).read_bytes() == data
    assert len(server.requests) == 2


def test_base_url_replaces_the_host(server: Server, tmp_path: Path) -> None:
    served = server.publish("train-labels-idx1-ubyte.gz", b"labels")
    remote = RemoteFile(
        "https://unreachable.invalid/mnist/train-labels-idx1-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        served.sha256,
    )
    path = download_file(remote, tmp_path, base_url=f"{server.url}/files/", progress=False)
    assert path.read_bytes() == b"labels"
    assert server.requests == ["/files/train-labels-idx1-ubyte.gz"]


def test_wrong_checksum_leaves_nothing(server: Server, tmp_path: Path) -> None:
    good = server.publish("blob.bin", b"x" * 1000)
    wrong = RemoteFile(good.url, good.filename, "0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError) as info:
        download_file(wrong, dest, progress=False)
    message = str(info.value)
    assert "blob.bin" in message
    assert "0" * 64 in message
    assert good.sha256 in message
    assert list(dest.iterdir()) == []
    assert isinstance(info.value, DataError)


def test_http_error_is_a_data_error(server: Server, tmp_path: Path) -> None:
    missing = RemoteFile(f"{server.url}/files/missing.gz", "missing.gz", "0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=re.escape(f"download of {missing.url} failed: HTTP 404")):
        download_file(missing, dest, progress=False)
    assert list(dest.iterdir()) == []


def test_unknown_dataset_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data set 'imagenet'; valid choices: mnist, "):
        download_dataset("imagenet", tmp_path)


def test_published_entries_are_well_formed() -> None:
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10"}
    for files in DATASETS.values():
        for remote in files:
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
            assert remote.url.endswith("/" + remote.filename)
    names = {r.filename for r in DATASETS["mnist"]}
    assert names == {r.filename for r in DATASETS["fashion_mnist"]}
    assert len(names) == 4


def test_download_fashion_mnist_writes_labels(server: Server, tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(20, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(10, dtype=np.uint8),
    }
    files = []
    for name, array in arrays.items():
        write_idx(build / name, array)
        files.append(server.publish(name, (build / name).read_bytes()))

    folder = download_dataset("fashion_mnist", tmp_path / "fashion", files=files)
    bundle = load_data("idx", folder)
    assert bundle.labels == list(FASHION_MNIST_LABELS)
    assert (len(bundle.train_y), len(bundle.val_y)) == (20, 10)


def _cifar_archive(tmp_path: Path) -> bytes:
    """A cifar-10-python.tar.gz holding a small cifar-10-batches-py folder."""
    folder = make_cifar_folder(tmp_path / "cifar-src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return buffer.getvalue()


def test_download_cifar10_extracts_a_loadable_folder(server: Server, tmp_path: Path) -> None:
    remote = server.publish("cifar-10-python.tar.gz", _cifar_archive(tmp_path))
    dest = tmp_path / "cifar"
    folder = download_dataset("cifar10", dest, files=[remote])
    assert folder == dest / "cifar-10-batches-py"
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py", remote.filename]
    bundle = load_data("cifar10", folder)
    assert bundle.labels[:2] == ["airplane", "automobile"]
    assert bundle.train_x.shape == (20, 3, 32, 32)

    # A second call finds the archive and the folder: no download, no extraction.
    assert download_dataset("cifar10", dest, files=[remote]) == folder
    assert len(server.requests) == 1


def test_cifar10_archive_without_the_folder(server: Server, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("something-else.txt")
        tar.addfile(info, io.BytesIO(b""))
    remote = server.publish("cifar-10-python.tar.gz", buffer.getvalue())
    dest = tmp_path / "cifar"
    with pytest.raises(DataError, match="has no cifar-10-batches-py/ folder"):
        download_dataset("cifar10", dest, files=[remote])
    assert sorted(p.name for p in dest.iterdir()) == [remote.filename]  # staging removed
