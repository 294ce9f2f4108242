"""Partitioners: split a centralised data set into per-client index arrays.

Common contract of `iid`, `dirichlet`, `shards` and `quantity_skew`:
  * they return `list[np.ndarray]`, one int64 array of example indices per client, in client
    order; every array is sorted ascending;
  * the arrays are pairwise disjoint and together cover `range(n_examples)` exactly;
  * the result is a pure function of the arguments: the same `seed` gives the same partition
    (randomness comes only from `np.random.default_rng(seed)`);
  * impossible inputs (n_clients <= 0, more clients than examples, alpha <= 0, ...) raise
    `ValueError` with a message that names the offending argument.
`natural` groups by an existing key (e.g. writer id) instead and needs no seed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["dirichlet", "iid", "natural", "quantity_skew", "shards"]

IndexArray = NDArray[np.int64]
K = TypeVar("K", bound=Hashable)


def _check_clients(n_examples: int, n_clients: int, min_size: int = 1) -> None:
    if n_clients <= 0:
        raise ValueError(f"n_clients must be positive, got {n_clients}")
    if n_examples < 0:
        raise ValueError(f"n_examples must be non-negative, got {n_examples}")
    if min_size < 0:
        raise ValueError(f"min_size must be non-negative, got {min_size}")
    if n_clients > n_examples:
        raise ValueError(f"cannot split {n_examples} examples among {n_clients} clients")
    if n_clients * min_size > n_examples:
        raise ValueError(
            f"cannot give each of {n_clients} clients at least min_size={min_size} examples "
            f"out of {n_examples}"
        )


def _labels_1d(labels: ArrayLike) -> NDArray[np.generic]:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def _split_sorted(order: IndexArray, sizes: NDArray[np.int64]) -> list[IndexArray]:
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(order, bounds)]


def iid(n_examples: int, n_clients: int, seed: int) -> list[IndexArray]:
    """Uniformly random partition into `n_clients` parts whose sizes differ by at most one."""
    _check_clients(n_examples, n_clients)
    order = np.random.default_rng(seed).permutation(n_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def dirichlet(
    labels: ArrayLike,
    n_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[IndexArray]:
    """Label-skewed partition (Hsu et al., 2019): per class, Dirichlet(alpha) client shares.

    For every class c, the class's examples are shuffled and cut among the clients according to
    proportions p_c ~ Dir(alpha * 1_{n_clients}). Small alpha (e.g. 0.1) gives each client few
    dominant classes; large alpha (e.g. 100) approaches an IID split. The whole draw is repeated
    until every client holds at least `min_size` examples; after `max_tries` failed draws a
    `ValueError` suggests a larger alpha or a smaller min_size.
    """
    y = _labels_1d(labels)
    _check_clients(len(y), n_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if max_tries <= 0:
        raise ValueError(f"max_tries must be positive, got {max_tries}")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_tries):
        parts: list[list[IndexArray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ValueError(
        f"dirichlet: no draw gave every one of {n_clients} clients at least min_size={min_size} "
        f"examples in {max_tries} tries (alpha={alpha}); use a larger alpha, a smaller "
        "min_size or fewer clients"
    )


def shards(
    labels: ArrayLike, n_clients: int, seed: int, *, shards_per_client: int = 2
) -> list[IndexArray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Examples are sorted by label (stable, so ties keep their original order), cut into
    `n_clients * shards_per_client` contiguous shards of equal size (sizes differ by at most one
    when the division is not exact) and each client receives `shards_per_client` shards chosen
    uniformly at random without replacement. With MNIST, 100 clients and 2 shards per client this
    is the paper's 200 shards of 300 images. A shard may straddle a label boundary, so a client
    holds at most 2 * shards_per_client labels, and most hold at most shards_per_client.
    """
    y = _labels_1d(labels)
    if shards_per_client <= 0:
        raise ValueError(f"shards_per_client must be positive, got {shards_per_client}")
    _check_clients(len(y), n_clients)
    n_shards = n_clients * shards_per_client
    if n_shards > len(y):
        raise ValueError(
            f"cannot cut {len(y)} examples into {n_shards} shards "
            f"({n_clients} clients x {shards_per_client} shards per client)"
        )
    order = np.argsort(y, kind="stable").astype(np.int64)
    pieces = np.array_split(order, n_shards)
    assignment = np.random.default_rng(seed).permutation(n_shards).reshape(n_clients, -1)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def quantity_skew(
    n_examples: int,
    n_clients: int,
    seed: int,
    *,
    alpha: float | None = None,
    sigma: float | None = None,
    min_size: int = 1,
) -> list[IndexArray]:
    """IID labels, skewed client sizes; give exactly one of `alpha` or `sigma`.

    Client shares p are drawn from Dir(alpha * 1) (`alpha`: smaller is more skewed) or
    proportional to LogNormal(0, sigma) weights (`sigma`: larger is more skewed). Every client
    first gets `min_size` examples; the remaining examples are allotted by a multinomial draw
    with probabilities p. The examples are then assigned by a uniform random permutation.
    """
    if (alpha is None) == (sigma is None):
        raise ValueError(
            "quantity_skew: give exactly one of alpha (Dirichlet) or sigma (lognormal)"
        )
    _check_clients(n_examples, n_clients, min_size)
    rng = np.random.default_rng(seed)
    if alpha is not None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        shares = rng.dirichlet(np.full(n_clients, alpha))
    else:
        assert sigma is not None
        if not sigma >= 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        weights = rng.lognormal(0.0, sigma, size=n_clients)
        shares = weights / weights.sum()
    remaining = n_examples - n_clients * min_size
    sizes = min_size + rng.multinomial(remaining, shares).astype(np.int64)
    order = rng.permutation(n_examples).astype(np.int64)
    return _split_sorted(order, sizes)


def natural(keys: Iterable[K]) -> dict[K, IndexArray]:
    """Group example indices by key (e.g. writer or speaker id): the natural partition.

    Returns a dict from each distinct key, in order of first appearance, to the ascending int64
    indices i with keys[i] == key. Deterministic; every index appears under exactly one key.
    """
    groups: dict[K, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {key: np.asarray(idx, dtype=np.int64) for key, idx in groups.items()}
