"""Contracts of the seeded partitioners in fedloom.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.data.partition import dirichlet, iid, natural, quantity_skew, shards

# MNIST train label counts (SOURCES.md). Only the counts matter to the label-based partitioners,
# so a shuffled synthetic array with these counts stands in for the real labels.
MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    labels = np.repeat(np.arange(10), MNIST_COUNTS)
    return np.random.default_rng(123).permutation(labels)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    joined = np.concatenate(parts)
    assert len(joined) == n, "disjoint: no index appears twice"
    assert np.array_equal(np.sort(joined), np.arange(n)), "full coverage"


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    values = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        values.append(float(-(freq * np.log(freq)).sum()))
    return float(np.mean(values))


def test_iid_cover_balance_and_seeding() -> None:
    parts = iid(1003, 10, seed=0)
    assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    assert same(parts, iid(1003, 10, seed=0))
    assert not same(parts, iid(1003, 10, seed=1))


def test_dirichlet_cover_min_size_and_seeding(mnist_labels: np.ndarray) -> None:
    parts = dirichlet(mnist_labels, 100, alpha=0.5, seed=0, min_size=10)
    assert_exact_cover(parts, len(mnist_labels))
    assert min(len(p) for p in parts) >= 10
    assert same(parts, dirichlet(mnist_labels, 100, alpha=0.5, seed=0, min_size=10))
    assert not same(parts, dirichlet(mnist_labels, 100, alpha=0.5, seed=1, min_size=10))


def test_dirichlet_small_alpha_is_more_skewed(mnist_labels: np.ndarray) -> None:
    skewed = label_entropy(dirichlet(mnist_labels, 20, alpha=0.1, seed=0), mnist_labels)
    mild = label_entropy(dirichlet(mnist_labels, 20, alpha=100.0, seed=0), mnist_labels)
    # log(10) = 2.30 is the entropy of a uniform label mix.
    assert mild > 2.2
    assert skewed < 1.5
    assert skewed < mild - 0.8


def test_dirichlet_gives_up_with_clear_error() -> None:
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match=r"min_size=15.*20 tries"):
        dirichlet(labels, 50, alpha=0.01, seed=0, min_size=15, max_tries=20)


def test_shards_mcmahan_mnist(mnist_labels: np.ndarray) -> None:
    parts = shards(mnist_labels, 100, seed=0, shards_per_client=2)
    assert_exact_cover(parts, 60000)
    assert {len(p) for p in parts} == {600}  # 2 shards of 300
    n_labels = [len(np.unique(mnist_labels[p])) for p in parts]
    # A shard of 300 sorted labels crosses at most one label boundary; the 9 class boundaries
    # fall inside 9 shards (no cumulative count is a multiple of 300), so at most 9 clients can
    # hold more than 2 labels and none more than 4.
    assert max(n_labels) <= 4
    assert sum(k <= 2 for k in n_labels) >= 91
    assert same(parts, shards(mnist_labels, 100, seed=0))
    assert not same(parts, shards(mnist_labels, 100, seed=1))


def test_shards_uneven_sizes_still_cover() -> None:
    labels = np.arange(103) % 7
    parts = shards(labels, 5, seed=3, shards_per_client=3)
    assert_exact_cover(parts, 103)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 3


@pytest.mark.parametrize(("kwargs", "floor"), [({"alpha": 0.3}, 5), ({"sigma": 1.5}, 1)])
def test_quantity_skew_cover_and_spread(kwargs: dict[str, float], floor: int) -> None:
    parts = quantity_skew(10000, 50, seed=0, min_size=floor, **kwargs)
    assert_exact_cover(parts, 10000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= floor
    assert sizes.max() > 5 * np.median(sizes), "a few clients hold much more data"
    assert same(parts, quantity_skew(10000, 50, seed=0, min_size=floor, **kwargs))
    assert not same(parts, quantity_skew(10000, 50, seed=1, min_size=floor, **kwargs))


def test_quantity_skew_spread_grows_with_sigma() -> None:
    def spread(sigma: float) -> float:
        sizes = [len(p) for p in quantity_skew(20000, 100, seed=0, sigma=sigma)]
        return float(np.std(sizes) / np.mean(sizes))

    assert spread(0.1) < 0.2 < 1.0 < spread(2.0)


def test_natural_groups_by_key_in_first_appearance_order() -> None:
    groups = natural(["b", "a", "b", "c", "a", "b"])
    assert list(groups) == ["b", "a", "c"]
    assert groups["b"].tolist() == [0, 2, 5]
    assert groups["a"].tolist() == [1, 4]
    assert groups["c"].tolist() == [3]
    assert_exact_cover(list(groups.values()), 6)
    assert sorted(natural(np.array([3, 1, 3]))) == [1, 3]
    assert natural([]) == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(10, 0, seed=0), "n_clients must be positive"),
        (lambda: iid(5, 10, seed=0), "cannot split 5 examples among 10 clients"),
        (lambda: dirichlet([0, 1, 0, 1], 2, alpha=0.0, seed=0, min_size=1), "alpha must be"),
        (lambda: dirichlet([0, 1, 0, 1], 2, alpha=-1.0, seed=0, min_size=1), "alpha must be"),
        (lambda: dirichlet([0, 1, 0, 1], 2, alpha=1.0, seed=0, min_size=3), "at least min_size"),
        (lambda: dirichlet([[0, 1]], 1, alpha=1.0, seed=0), "one-dimensional"),
        (lambda: shards([0, 1, 2], 2, seed=0), "cannot cut 3 examples into 4 shards"),
        (lambda: shards([0, 1], 1, seed=0, shards_per_client=0), "shards_per_client"),
        (lambda: quantity_skew(10, 2, seed=0), "exactly one of alpha"),
        (lambda: quantity_skew(10, 2, seed=0, alpha=1.0, sigma=1.0), "exactly one of alpha"),
        (lambda: quantity_skew(10, 2, seed=0, alpha=0.0), "alpha must be"),
        (lambda: quantity_skew(10, 0, seed=0, sigma=1.0), "n_clients must be positive"),
    ],
)
def test_impossible_inputs_are_rejected(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
