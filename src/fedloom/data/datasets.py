"""Typed containers and loaders for the benchmark data sets.

Files are looked up under a data root (`data_dir`): the `root` argument, else the directory in
the environment variable `FEDLOOM_DATA`, else `~/.cache/fedloom`. The expected layout is that of
`shared/data` (see its SOURCES.md): `mnist/`, `fashion-mnist/`, `femnist/<subset>/{train,test}/`
and `shakespeare/t8.shakespeare.txt.gz`. A missing file raises `DatasetNotFoundError` naming the
path and what to do; an unreadable or inconsistent file raises `CorruptDataError` naming it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedloom.data.download import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_MIRRORS,
    MNIST_FILES,
    MNIST_MIRRORS,
    fetch_files,
)

ENV_VAR = "FEDLOOM_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A data file is missing; the message names the path and how to provide it."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be parsed or is inconsistent; the message names it."""


@dataclass(frozen=True)
class ArrayDataset:
    """Examples `x` (first axis = example) with integer labels `y` (int64, shape (n,))."""

    x: NDArray[Any]
    y: NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has shape {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: ArrayLike) -> ArrayDataset:
        """The examples at `indices` (e.g. one client's part from `fedloom.data.partition`)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class FederatedDataset:
    """A naturally partitioned data set: client id -> (train, test), in a fixed client order.

    `num_classes` is the number of label values (labels are 0 .. num_classes-1).
    """

    clients: dict[str, tuple[ArrayDataset, ArrayDataset]]
    num_classes: int

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def client_ids(self) -> list[str]:
        """Client ids in their fixed order."""
        return list(self.clients)

    def pooled(self, split: Literal["train", "test"]) -> ArrayDataset:
        """All clients' `split` examples concatenated in client order (a copy; may be large)."""
        parts = [pair[0 if split == "train" else 1] for pair in self.clients.values()]
        return ArrayDataset(
            np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
        )


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data root: `path`, else $FEDLOOM_DATA if non-empty, else ~/.cache/fedloom.

    The directory is not created or checked; `~` is expanded.
    """
    if path is None:
        path = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "fedloom"
    return Path(path).expanduser()


def _not_found(path: Path, what: str, hint: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{what} not found: {path}. {hint} Otherwise pass root=... or set {ENV_VAR} to the "
        "directory that holds the data sets."
    )


# --------------------------------------------------------------------------- MNIST-like (IDX)


def _read_idx(path: Path, magic: int, ndim: int) -> NDArray[np.uint8]:
    """Parse a gzipped big-endian IDX file of uint8 values with `ndim` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDataError(f"{path}: cannot decompress gzip data ({e})") from e
    header = 4 * (ndim + 1)
    if len(data) < header:
        raise CorruptDataError(f"{path}: truncated IDX header ({len(data)} bytes)")
    got, *dims = struct.unpack(f">{ndim + 1}I", data[:header])
    if got != magic:
        raise CorruptDataError(f"{path}: IDX magic number is {got}, expected {magic}")
    if len(data) - header != int(np.prod(dims)):
        raise CorruptDataError(
            f"{path}: header promises {dims} = {int(np.prod(dims))} values but the body has "
            f"{len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_split(images: Path, labels: Path, flatten: bool) -> ArrayDataset:
    img = _read_idx(images, 2051, 3)
    lab = _read_idx(labels, 2049, 1)
    if len(img) != len(lab):
        raise CorruptDataError(f"{images} has {len(img)} images but {labels} has {len(lab)} labels")
    if img.shape[1:] != (28, 28):
        raise CorruptDataError(f"{images}: images are {img.shape[1:]}, expected (28, 28)")
    if len(lab) and lab.max() > 9:
        raise CorruptDataError(f"{labels}: label {lab.max()} out of range 0..9")
    x = np.divide(img, 255, dtype=np.float32)
    x = x.reshape(len(x), 784) if flatten else x.reshape(len(x), 1, 28, 28)
    return ArrayDataset(x, lab.astype(np.int64))


_IDX_SETS = {
    "mnist": ("MNIST", MNIST_FILES, MNIST_MIRRORS),
    "fashion-mnist": ("Fashion-MNIST", FASHION_MNIST_FILES, FASHION_MNIST_MIRRORS),
}


def _load_idx_set(
    subdir: str,
    root: str | os.PathLike[str] | None,
    download: bool,
    flatten: bool,
    base_url: str | Sequence[str] | None,
    timeout: float,
) -> tuple[ArrayDataset, ArrayDataset]:
    what, files, mirrors = _IDX_SETS[subdir]
    directory = data_dir(root) / subdir
    if download:
        urls = [base_url] if isinstance(base_url, str) else (base_url or mirrors)
        fetch_files(files, directory, list(urls), timeout=timeout)
    for name in files:
        if not (directory / name).is_file():
            raise _not_found(directory / name, f"{what} file", "Pass download=True to fetch it.")
    train, test = (
        _idx_split(
            directory / f"{s}-images-idx3-ubyte.gz",
            directory / f"{s}-labels-idx1-ubyte.gz",
            flatten,
        )
        for s in ("train", "t10k")
    )
    return train, test


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    *,
    flatten: bool = True,
    base_url: str | Sequence[str] | None = None,
    timeout: float = 60.0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST as (train, test): 60000 and 10000 examples from `<root>/mnist/*.gz` (IDX format).

    x is float32 in [0, 1] (pixel / 255) of shape (n, 784), or (n, 1, 28, 28) when
    `flatten=False`; y is int64 in 0..9. With `download=True`, missing files are fetched from
    `base_url` (a base URL or a list of them; default `MNIST_MIRRORS`) and verified against their
    known SHA-256 (`ChecksumError` on mismatch); files already present are used as they are.
    """
    return _load_idx_set("mnist", root, download, flatten, base_url, timeout)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    *,
    flatten: bool = True,
    base_url: str | Sequence[str] | None = None,
    timeout: float = 60.0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST from `<root>/fashion-mnist/`; same contract as `load_mnist`.

    Labels 0..9 are T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag,
    Ankle boot.
    """
    return _load_idx_set("fashion-mnist", root, download, flatten, base_url, timeout)


# --------------------------------------------------------------------------------- FEMNIST


def _leaf_shards(directory: Path) -> list[Path]:
    files = [p for p in directory.glob("*.json*") if p.name.endswith((".json", ".json.gz"))]
    return sorted(files, key=lambda p: ([int(d) for d in re.findall(r"\d+", p.name)], p.name))


def _read_leaf(path: Path) -> dict[str, ArrayDataset]:
    """One LEAF JSON shard -> {user: examples}, with x as float32 (n, 784)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                doc = json.loads(f.read())
        else:
            doc = json.loads(path.read_bytes())
        out: dict[str, ArrayDataset] = {}
        for user in doc["users"]:
            data = doc["user_data"][user]
            x = np.asarray(data["x"], dtype=np.float32).reshape(-1, 784)
            out[str(user)] = ArrayDataset(x, np.asarray(data["y"], dtype=np.int64))
    except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as e:
        raise CorruptDataError(f"{path}: not a valid LEAF JSON shard ({e!r})") from e
    return out


def load_femnist(
    root: str | os.PathLike[str] | None = None,
    *,
    subset: str = "leaf_niid_0.05",
    max_clients: int | None = None,
) -> FederatedDataset:
    """FEMNIST partitioned by writer, from LEAF JSON shards in `<root>/femnist/<subset>/`.

    Reads every `train/*.json[.gz]` and `test/*.json[.gz]` shard (shards in numeric order,
    users in file order); each writer is one client with its LEAF train and test samples. x is
    float32 (n, 784) in [0, 1] as LEAF stores it (1.0 = white background), y int64 in 0..61,
    `num_classes` 62. `max_clients` keeps the first writers in that order. The shipped subset
    has 105 writers, 14708 train and 1685 test samples. Not downloadable: produce the shards
    with LEAF's preprocessing (`-s niid --sf 0.05 -k 0 -t sample`) if they are missing.
    """
    if max_clients is not None and max_clients <= 0:
        raise ValueError(f"max_clients must be positive, got {max_clients}")
    base = data_dir(root) / "femnist" / subset
    train_files, test_files = _leaf_shards(base / "train"), _leaf_shards(base / "test")
    if not train_files:
        raise _not_found(base / "train", "FEMNIST train shards (*.json or *.json.gz)",
                         "Generate them with LEAF's FEMNIST preprocessing.")  # fmt: skip
    train: dict[str, ArrayDataset] = {}
    for path in train_files:
        train.update(_read_leaf(path))
        if max_clients is not None and len(train) >= max_clients:
            break
    users = list(train)[:max_clients]
    test: dict[str, ArrayDataset] = {}
    for path in test_files:
        test.update(_read_leaf(path))
    empty = ArrayDataset(np.zeros((0, 784), np.float32), np.zeros(0, np.int64))
    return FederatedDataset({u: (train[u], test.get(u, empty)) for u in users}, num_classes=62)


# -------------------------------------------------------------------------------- sklearn


def load_sklearn(
    name: Literal["breast_cancer", "digits", "wine"], *, test_size: float = 0.25, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """A small scikit-learn bundled data set as (train, test); no download.

    The split is stratified by label and seeded (`train_test_split(..., random_state=seed)`).
    x is float32 with the raw (unscaled) features, y int64. Sizes with test_size=0.25:
    breast_cancer 426/143 (30 features, 2 classes), digits 1347/450 (64, 10), wine 133/45 (13, 3).
    """
    from sklearn import datasets as skd
    from sklearn.model_selection import train_test_split

    loaders = {
        "breast_cancer": skd.load_breast_cancer,
        "digits": skd.load_digits,
        "wine": skd.load_wine,
    }
    if name not in loaders:
        raise ValueError(f"unknown sklearn data set {name!r}; choose one of {sorted(loaders)}")
    bunch = loaders[name]()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return (
        ArrayDataset(np.asarray(x_tr), np.asarray(y_tr, dtype=np.int64)),
        ArrayDataset(np.asarray(x_te), np.asarray(y_te, dtype=np.int64)),
    )
