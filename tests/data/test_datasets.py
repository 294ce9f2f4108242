"""Loaders against the offline copies in shared/data (see shared/data/SOURCES.md)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from fedloom.data import (
    ALL_LETTERS,
    ArrayDataset,
    CorruptDataError,
    DatasetNotFoundError,
    FederatedDataset,
    data_dir,
    load_fashion_mnist,
    load_femnist,
    load_mnist,
    load_shakespeare,
    load_sklearn,
)


def shared_data() -> Path:
    """The repository's offline data: $FEDLOOM_DATA, else <workspace>/shared/data."""
    env = os.environ.get("FEDLOOM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


ROOT = shared_data()
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
needs_data = pytest.mark.skipif(not ROOT.is_dir(), reason=f"offline data not found at {ROOT}")


@pytest.fixture(scope="module")
def femnist() -> FederatedDataset:
    return load_femnist(ROOT)


@pytest.fixture(scope="module")
def shakespeare() -> FederatedDataset:
    return load_shakespeare(ROOT)


def decode(codes: np.ndarray) -> str:
    return "".join(ALL_LETTERS[i] for i in codes)


# ------------------------------------------------------------------ containers and paths


def test_array_dataset_checks_lengths_and_subsets() -> None:
    ds = ArrayDataset(np.arange(12.0).reshape(6, 2), np.arange(6, dtype=np.int64))
    assert len(ds) == 6
    sub = ds.subset([4, 1])
    assert sub.y.tolist() == [4, 1] and sub.x.tolist() == [[8.0, 9.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match="5 rows"):
        ArrayDataset(np.zeros((5, 2)), np.zeros(6, dtype=np.int64))


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDLOOM_DATA", str(tmp_path / "env"))
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("FEDLOOM_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "fedloom"
    assert data_dir("~/x") == tmp_path / "home" / "x"


def test_missing_files_name_path_and_remedy(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"mnist.*download=True.*FEDLOOM_DATA"):
        load_mnist(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"femnist.leaf_niid_0\.05.train"):
        load_femnist(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"t8\.shakespeare\.txt\.gz"):
        load_shakespeare(tmp_path)
    with pytest.raises(ValueError, match="unknown sklearn data set 'iris'"):
        load_sklearn("iris")  # type: ignore[arg-type]


def write_idx_set(directory: Path, images: bytes, labels: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (struct.pack(">IIII", 2049, 1, 28, 28) + bytes(784), b"", "magic number is 2049"),
        (struct.pack(">IIII", 2051, 2, 28, 28) + bytes(784), b"", "promises"),
        (b"\x00\x00", b"", "truncated"),
        (
            struct.pack(">IIII", 2051, 1, 28, 28) + bytes(784),
            struct.pack(">II", 2049, 2) + bytes(2),
            "1 images but .* has 2 labels",
        ),
    ],
)
def test_corrupt_idx_names_the_file(
    tmp_path: Path, images: bytes, labels: bytes, message: str
) -> None:
    write_idx_set(tmp_path / "mnist", images, labels or struct.pack(">II", 2049, 1) + b"\x03")
    with pytest.raises(CorruptDataError, match=message) as info:
        load_mnist(tmp_path)
    assert "train-" in str(info.value) and str(tmp_path) in str(info.value)


def test_not_gzip_names_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", b"", b"")
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes")
    with pytest.raises(CorruptDataError, match=r"train-images-idx3-ubyte\.gz: cannot decompress"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------ real data


@needs_data
def test_mnist() -> None:
    train, test = load_mnist(ROOT)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 784) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(train.y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test.y).tolist() == MNIST_TEST_COUNTS


@needs_data
def test_fashion_mnist_unflattened() -> None:
    train, test = load_fashion_mnist(ROOT, flatten=False)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(train.y).tolist() == [6000] * 10
    assert np.bincount(test.y).tolist() == [1000] * 10


@needs_data
def test_femnist(femnist: FederatedDataset) -> None:
    assert len(femnist) == 105 and femnist.num_classes == 62
    assert sum(len(tr) for tr, _ in femnist.clients.values()) == 14708
    assert sum(len(te) for _, te in femnist.clients.values()) == 1685
    for train, test in femnist.clients.values():
        assert len(train) > 0 and len(test) > 0
        for ds in (train, test):
            assert ds.x.dtype == np.float32 and ds.x.shape[1] == 784
            assert ds.y.dtype == np.int64
            assert ds.y.min() >= 0 and ds.y.max() < 62
            assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    pooled = femnist.pooled("train")
    assert len(pooled) == 14708 and len(np.unique(pooled.y)) > 50


@needs_data
def test_femnist_max_clients(femnist: FederatedDataset) -> None:
    few = load_femnist(ROOT, max_clients=3)
    assert few.client_ids == femnist.client_ids[:3]
    for cid in few.client_ids:
        assert np.array_equal(few.clients[cid][0].x, femnist.clients[cid][0].x)
        assert np.array_equal(few.clients[cid][1].y, femnist.clients[cid][1].y)


@needs_data
def test_shakespeare_roles_and_windows(shakespeare: FederatedDataset) -> None:
    assert len(shakespeare) == 1145  # LEAF's count of (play, role) users with > 2 lines
    assert shakespeare.num_classes == len(ALL_LETTERS) == 80
    total = sum(len(tr) + len(te) for tr, te in shakespeare.clients.values())
    assert total == 4331316
    assert shakespeare.client_ids[0] == "ALLS_WELL_THAT_ENDS_WELL_COUNTESS"
    for train, test in list(shakespeare.clients.values())[::50]:
        assert len(train) > 0 and len(test) == max(int(0.1 * (len(train) + len(test))), 1)
        for ds in (train, test):
            assert ds.x.shape[1] == 80 and ds.x.dtype == np.int64 and ds.y.dtype == np.int64
            assert ds.x.min() >= 0 and ds.x.max() < 80 and ds.y.max() < 80
            # y is the next character: window i+1 is window i shifted left, then y[i].
            assert np.array_equal(ds.x[1:, :-1], ds.x[:-1, 1:])
            assert np.array_equal(ds.x[1:, -1], ds.y[:-1])
        assert np.array_equal(test.x[0, :-1], train.x[-1, 1:]) and test.x[0, -1] == train.y[-1]


@needs_data
def test_shakespeare_text_matches_source(shakespeare: FederatedDataset) -> None:
    train, _ = shakespeare.clients["ALLS_WELL_THAT_ENDS_WELL_COUNTESS"]
    assert decode(train.x[0]) == " " * 80
    text = decode(train.y[:200])
    assert text.startswith("In delivering my son from me, I bury a second husband.\n")
    with gzip.open(ROOT / "shakespeare" / "t8.shakespeare.txt.gz", "rt") as f:
        raw = f.read()
    assert "COUNTESS. In delivering my son from me, I bury a second husband." in raw


@needs_data
def test_shakespeare_leaf_padding_and_limits(shakespeare: FederatedDataset) -> None:
    small = load_shakespeare(ROOT, seq_len=20, max_clients=4, pad_lines=True, test_fraction=0.2)
    assert small.client_ids == shakespeare.client_ids[:4]
    cid = small.client_ids[0]
    train, test = small.clients[cid]
    full_train, full_test = shakespeare.clients[cid]
    ys = np.concatenate([train.y, test.y])
    assert np.array_equal(ys, np.concatenate([full_train.y, full_test.y])), "same targets"
    assert len(test) == int(0.2 * len(ys)) and train.x.shape[1] == 20
    # LEAF's context restarts at each line: the sample after a newline sees only spaces.
    after_newline = np.flatnonzero(train.y[:-1] == ALL_LETTERS.index("\n")) + 1
    assert len(after_newline) > 0
    assert decode(train.x[after_newline[0]]) == " " * 20


@pytest.mark.parametrize(
    ("name", "sizes", "features", "classes"),
    [
        ("breast_cancer", (426, 143), 30, 2),
        ("digits", (1347, 450), 64, 10),
        ("wine", (133, 45), 13, 3),
    ],
)
def test_sklearn(name: str, sizes: tuple[int, int], features: int, classes: int) -> None:
    train, test = load_sklearn(name, seed=0)  # type: ignore[arg-type]
    assert (len(train), len(test)) == sizes
    assert train.x.shape[1] == features and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and set(np.unique(test.y)) == set(range(classes))
    ratio = np.bincount(test.y) / np.bincount(train.y)
    assert np.allclose(ratio, 1 / 3, atol=0.05), "stratified"
    again, _ = load_sklearn(name, seed=0)  # type: ignore[arg-type]
    other, _ = load_sklearn(name, seed=1)  # type: ignore[arg-type]
    assert np.array_equal(again.x, train.x) and not np.array_equal(other.x, train.x)
