import pytest

from fedloom.runtime.selection import (
    SelectionError,
    client_seed,
    client_seeds,
    round_rng,
    sample_size,
    select_clients,
)


def test_sample_size_follows_fraction_and_minimum() -> None:
    assert sample_size(100, 0.1, 1) == 10
    assert sample_size(100, 0.1, 20) == 20
    assert sample_size(7, 0.5, 1) == 4
    assert sample_size(5, 1.0, 1) == 5
    with pytest.raises(SelectionError, match="3 clients available, at least 4"):
        sample_size(3, 0.5, 4)


def test_selection_is_seeded_and_without_replacement() -> None:
    ids = [f"c{i}" for i in range(100)]
    a = select_clients(ids, 0.1, 1, round_rng(0, 1))
    b = select_clients(ids, 0.1, 1, round_rng(0, 1))
    c = select_clients(ids, 0.1, 1, round_rng(0, 2))
    assert a == b and a != c
    assert len(set(a)) == 10


def test_selection_is_roughly_uniform() -> None:
    ids = [f"c{i}" for i in range(20)]
    counts = dict.fromkeys(ids, 0)
    for r in range(2000):
        for cid in select_clients(ids, 0.25, 1, round_rng(3, r)):
            counts[cid] += 1
    # each client is expected 2000 * 5/20 = 500 times
    assert min(counts.values()) > 430 and max(counts.values()) < 570


def test_client_seed_depends_on_run_round_and_client() -> None:
    seeds = {client_seed(s, r, c) for s in range(3) for r in range(3) for c in range(3)}
    assert len(seeds) == 27
    assert all(0 <= s < 2**31 for s in seeds)
    assert client_seed(1, 2, 3) == client_seed(1, 2, 3)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**40])
@pytest.mark.parametrize("round_number", [1, 2, 999, 2**32 - 1])
def test_client_seeds_equal_client_seed(seed: int, round_number: int) -> None:
    """The vectorized seeds are SeedSequence's, bit for bit (seeds past 32 bits fall back)."""
    indices = [0, 1, 2, 7, 99, 1000, 65535, 2**20 + 3, 2**32 - 1]
    want = [client_seed(seed, round_number, i) for i in indices]
    assert client_seeds(seed, round_number, indices) == want
    assert len(set(want)) == len(want)
