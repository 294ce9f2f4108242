"""Downloading data files with SHA-256 verification (standard library only).

`download` never leaves a partial or unverified file at its destination: bytes go to a temporary
file beside `dest`, are hashed while they are written, and the temporary file is renamed onto
`dest` (atomically, with `os.replace`) only when the hash matches.

The module also records the official files of MNIST and Fashion-MNIST, with their SHA-256
values, and the mirrors they are fetched from (`fetch_files`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MIRRORS",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "ChecksumError",
    "DownloadError",
    "download",
    "fetch_files",
    "sha256_file",
]

_CHUNK = 1 << 20

#: Base URLs (ending in "/") tried in order for the MNIST files.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
#: Base URLs (ending in "/") tried in order for the Fashion-MNIST files.
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def _sums(table: str) -> Mapping[str, str]:
    """Parse `sha256sum`-style lines ("<hex>  <name>") into {name: hex}."""
    return {name: digest for digest, name in (line.split() for line in table.strip().splitlines())}


#: File name -> SHA-256 of the official gzip files (see shared/data/SOURCES.md).
MNIST_FILES: Mapping[str, str] = _sums("""
440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609  train-images-idx3-ubyte.gz
3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c  train-labels-idx1-ubyte.gz
8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6  t10k-images-idx3-ubyte.gz
f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6  t10k-labels-idx1-ubyte.gz
""")
FASHION_MNIST_FILES: Mapping[str, str] = _sums("""
3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84  train-images-idx3-ubyte.gz
a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845  train-labels-idx1-ubyte.gz
346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073  t10k-images-idx3-ubyte.gz
67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5  t10k-labels-idx1-ubyte.gz
""")


class DownloadError(RuntimeError):
    """A file could not be fetched (network or HTTP error, or every mirror failed)."""


class ChecksumError(DownloadError):
    """The SHA-256 of downloaded bytes differs from the expected value.

    Attributes `path`, `expected` and `actual` name the file and both hex digests.
    """

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
            "the download was discarded"
        )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the lowercase hex SHA-256 of the file at `path` (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike[str], sha256: str, *, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` and verify its SHA-256; return `dest` as a `Path`.

    Contract:
      * parent directories of `dest` are created;
      * the bytes are written to a temporary file in `dest`'s directory and renamed onto `dest`
        only after the hash matched, so `dest` is either absent/unchanged or complete and valid;
      * on a hash mismatch the temporary file is deleted and `ChecksumError` is raised;
      * on a network, HTTP or timeout error, `DownloadError` naming `url` and `dest` is raised
        (chained to the original exception) and nothing is left behind.
    `timeout` (seconds) applies to connecting and to each blocking read.
    """
    dest = Path(dest)
    expected = sha256.lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as e:
                raise DownloadError(
                    f"failed to download {url} to {dest}: HTTP {e.code} {e.reason}"
                ) from e
            except (urllib.error.URLError, OSError) as e:
                raise DownloadError(f"failed to download {url} to {dest}: {e}") from e
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(dest, expected, actual)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_files(
    files: Mapping[str, str],
    directory: Path,
    mirrors: Sequence[str],
    *,
    timeout: float = 60.0,
) -> None:
    """Make sure every `files` entry (name -> sha256) exists in `directory`.

    Files already present are left alone (not re-hashed). Each missing file is downloaded from
    the first mirror that serves it with the right hash (`mirror + name`). If all mirrors fail,
    the single error is re-raised when there was one mirror; otherwise a `DownloadError` lists
    every attempt.
    """
    if not mirrors:
        raise ValueError("no mirrors given")
    for name, sha256 in files.items():
        dest = directory / name
        if dest.exists():
            continue
        errors: list[DownloadError] = []
        for base in mirrors:
            url = base if base.endswith("/") else base + "/"
            try:
                download(url + name, dest, sha256, timeout=timeout)
                break
            except DownloadError as e:
                errors.append(e)
        else:
            if len(errors) == 1:
                raise errors[0]
            listing = "\n  ".join(str(e) for e in errors)
            raise DownloadError(
                f"could not fetch {dest} from any mirror:\n  {listing}"
            ) from errors[-1]
