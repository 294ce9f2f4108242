"""Downloads with checksum verification, against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fedloom.data import ChecksumError, DatasetNotFoundError, DownloadError, download, load_mnist
from fedloom.data.download import MNIST_FILES, fetch_files, sha256_file


def shared_data() -> Path:
    """The repository's offline data: $FEDLOOM_DATA, else <workspace>/shared/data."""
    env = os.environ.get("FEDLOOM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve a fresh directory over HTTP; yields (base URL ending in "/", served directory)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_success(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    payload = os.urandom(3 << 20)  # several read chunks
    (served / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "nested" / "blob.bin"
    got = download(url + "blob.bin", dest, hashlib.sha256(payload).hexdigest().upper())
    assert got == dest
    assert dest.read_bytes() == payload
    assert leftovers(dest.parent) == ["blob.bin"], "no temporary file left behind"
    assert sha256_file(dest) == hashlib.sha256(payload).hexdigest()


def test_checksum_mismatch_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    (served / "blob.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "blob.bin"
    expected = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download(url + "blob.bin", dest, expected)
    actual = hashlib.sha256(b"tampered").hexdigest()
    message = str(info.value)
    assert str(dest) in message and expected in message and actual in message
    assert (info.value.path, info.value.expected, info.value.actual) == (dest, expected, actual)
    assert leftovers(dest.parent) == []


def test_mismatch_keeps_existing_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    (served / "blob.bin").write_bytes(b"new")
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download(url + "blob.bin", dest, "1" * 64)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "served"]


def test_http_404_is_reported(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "out" / "missing.gz"
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download(url + "missing.gz", dest, "0" * 64)
    assert url + "missing.gz" in str(info.value) and str(dest) in str(info.value)
    assert not isinstance(info.value, ChecksumError)
    assert leftovers(dest.parent) == []


def test_fetch_files_falls_back_to_next_mirror(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    (served / "good").mkdir()
    (served / "good" / "a.txt").write_bytes(b"alpha")
    files = {"a.txt": hashlib.sha256(b"alpha").hexdigest()}
    fetch_files(files, tmp_path / "cache", [url + "bad", url + "good/"])
    assert (tmp_path / "cache" / "a.txt").read_bytes() == b"alpha"
    with pytest.raises(DownloadError, match=r"from any mirror:(.|\n)*HTTP 404(.|\n)*HTTP 404"):
        fetch_files({"b.txt": "0" * 64}, tmp_path / "cache", [url + "x/", url + "y/"])


def test_load_mnist_downloads_and_verifies(server: tuple[str, Path], tmp_path: Path) -> None:
    source = shared_data() / "mnist"
    assert source.is_dir(), f"the test data must be beside the project: {source}"
    url, served = server
    for name in MNIST_FILES:
        (served / name).symlink_to(source / name)
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_mnist(root)
    train, test = load_mnist(root, download=True, base_url=url)
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(leftovers(root / "mnist")) == sorted(MNIST_FILES)
    # Present files are used without fetching: the server has nothing to serve any more.
    for p in served.iterdir():
        p.unlink()
    again, _ = load_mnist(root, download=True, base_url=url)
    assert np.array_equal(again.y, train.y)


def test_load_mnist_download_rejects_wrong_bytes(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    for name in MNIST_FILES:
        (served / name).write_bytes(b"not the real file")
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path, download=True, base_url=url, timeout=5)
    assert leftovers(tmp_path / "mnist") == []
