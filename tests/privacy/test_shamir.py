import itertools
import random
from collections import Counter

import pytest

from fedloom.privacy.shamir import (
    ELEMENT_BYTES,
    MAX_PARTIES,
    MAX_SECRET_BYTES,
    PRIME,
    Share,
    _eval_poly,
    _lagrange_at_zero,
    _split_elements,
    combine,
    split,
)

# Test-only randomness for picking subsets and secrets; the module itself uses `secrets`.
RNG = random.Random(20261123)

LENGTHS = [0, 1, 32, 33, 64, 65, 1000]


def _secret(length: int) -> bytes:
    return RNG.randbytes(length)


# --- reconstruction -------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_every_t_subset_reconstructs(length: int) -> None:
    secret = _secret(length)
    shares = split(secret, 5, 3)
    assert [s.index for s in shares] == [1, 2, 3, 4, 5]
    subsets = list(itertools.combinations(shares, 3))
    assert len(subsets) == 10
    for subset in subsets:
        assert combine(subset) == secret
        assert combine(subset[::-1]) == secret  # order does not matter
    assert combine(shares) == secret  # more than t shares is fine


def test_n100_t51_random_subsets() -> None:
    secret = _secret(32)
    shares = split(secret, 100, 51)
    for _ in range(5):
        assert combine(RNG.sample(shares, 51)) == secret
    with pytest.raises(ValueError, match="not enough shares"):
        combine(RNG.sample(shares, 50))


def test_high_bytes_survive() -> None:
    # All-0xff chunks are the largest values a chunk can hold; leading zeros must be kept.
    for secret in (b"\xff" * 64, b"\xff" * 65, b"\x00" * 33, b"\x00\x01"):
        assert combine(split(secret, 4, 2)[2:]) == secret


def test_threshold_one_every_share_alone_reconstructs() -> None:
    secret = _secret(33)
    shares = split(secret, 4, 1)
    for s in shares:
        assert combine([s]) == secret


def test_threshold_n_needs_all_shares() -> None:
    secret = _secret(32)
    shares = split(secret, 6, 6)
    assert combine(shares) == secret
    assert combine(list(reversed(shares))) == secret
    with pytest.raises(ValueError, match="not enough shares: threshold is 6, got 5"):
        combine(shares[:5])


def test_empty_secret_is_allowed_and_still_validated() -> None:
    shares = split(b"", 3, 2)
    assert all(s.values == () for s in shares)
    assert combine(shares[:2]) == b""
    with pytest.raises(ValueError, match="not enough shares"):
        combine(shares[:1])


def test_max_length_secret() -> None:
    secret = _secret(MAX_SECRET_BYTES)
    assert combine(split(secret, 3, 2)[1:]) == secret
    with pytest.raises(ValueError, match="MAX_SECRET_BYTES"):
        split(secret + b"x", 3, 2)


@pytest.mark.parametrize(
    ("n", "t", "message"),
    [
        (0, 1, "n must be in"),
        (MAX_PARTIES + 1, 2, "n must be in"),
        (5, 0, "threshold t must be in"),
        (5, 6, "threshold t must be in"),
    ],
)
def test_split_rejects_bad_parameters(n: int, t: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split(b"secret", n, t)


def test_split_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="secret must be bytes"):
        split("text", 3, 2)  # type: ignore[arg-type]


# --- secrecy --------------------------------------------------------------------------------


def test_t_minus_1_shares_are_a_bijection_of_the_random_coefficients() -> None:
    """Exhaustive, in GF(7) with t=3: for every secret, the map from the t-1 random coefficients
    to the t-1 share values at fixed indices is a bijection onto GF(7)^2. So with uniform
    coefficients those shares are uniform and identical in law for every secret."""
    p, t, xs = 7, 3, (2, 5)
    everything = set(itertools.product(range(p), repeat=t - 1))
    for s in range(p):
        images = [
            tuple(_eval_poly((s, *r), x, p) for x in xs)
            for r in itertools.product(range(p), repeat=t - 1)
        ]
        assert len(set(images)) == len(images) == p ** (t - 1)
        assert set(images) == everything
    # Control: t shares pin the secret down (the same map with one more index is not onto).
    xs3 = (*xs, 3)
    seen = {
        tuple(_eval_poly((0, *r), x, p) for x in xs3)
        for r in itertools.product(range(p), repeat=t - 1)
    }
    assert len(seen) == p ** (t - 1) < p**t


def test_t_minus_1_shares_are_uniform_chi_square() -> None:
    """Statistical, in GF(11) with t=3, using the real sampler: the joint values of shares 1 and
    2 are uniform over the 121 cells for two different secrets (chi-square, 120 degrees of
    freedom, critical value for p = 1e-6). A sampler that, say, drew coefficients from [1, p)
    or reused them would fail."""
    p, t, n, per_cell = 11, 3, 3, 50
    critical = 208.5  # scipy.stats.chi2.isf(1e-6, 120)
    draws = p * p * per_cell
    for secret in (0, 10):
        counts: Counter[tuple[int, int]] = Counter()
        triples = set()
        for _ in range(draws):
            y = [party[0] for party in _split_elements([secret], n, t, p)]
            counts[(y[0], y[1])] += 1
            triples.add(tuple(y))
        stat = sum((counts[(a, b)] - per_cell) ** 2 / per_cell for a in range(p) for b in range(p))
        assert stat < critical, (secret, stat)
        # Control: all t shares are far from uniform (the third is determined by the others).
        assert len(triples) <= p * p


# --- encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_to_bytes_round_trip(length: int) -> None:
    for share in split(_secret(length), 4, 3):
        data = share.to_bytes()
        assert len(data) == 7 + ELEMENT_BYTES * -(-length // 64)
        assert Share.from_bytes(data) == share
        assert Share.from_bytes(bytearray(data)) == share


def test_share_of_32_byte_secret_is_73_bytes() -> None:
    assert len(split(bytes(32), 2, 2)[0].to_bytes()) == 73


def _good() -> bytes:
    return Share(index=3, threshold=2, secret_length=32, values=(PRIME - 1,)).to_bytes()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (_good()[:6], "too short"),
        (b"\x02" + _good()[1:], "unknown version 2"),
        (_good()[:-1], "does not match a 32-byte secret"),
        (_good() + b"\x00", "does not match a 32-byte secret"),
        (_good()[:1] + b"\x00\x00" + _good()[3:], "share index must be in"),
        (_good()[:3] + b"\x00\x00" + _good()[5:], "share threshold must be in"),
        (_good()[:5] + b"\xff\xff" + _good()[7:], "share secret length must be in"),
        (_good()[:7] + PRIME.to_bytes(ELEMENT_BYTES, "big"), "share value 0 must be in"),
        (_good()[:7] + b"\xff" * ELEMENT_BYTES, "share value 0 must be in"),
    ],
)
def test_from_bytes_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Share.from_bytes(data)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"index": 0}, "share index must be in"),
        ({"index": MAX_PARTIES + 1}, "share index must be in"),
        ({"threshold": 0}, "share threshold must be in"),
        ({"secret_length": 65}, "needs 2 field elements, got 1"),
        ({"values": (-1,)}, "share value 0 must be in"),
        ({"values": (PRIME,)}, "share value 0 must be in"),
    ],
)
def test_share_rejects_bad_fields(fields: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"index": 1, "threshold": 2, "secret_length": 32, "values": (5,)}
    kwargs.update(fields)
    with pytest.raises(ValueError, match=message):
        Share(**kwargs)  # type: ignore[arg-type]


def test_share_rejects_bool_index() -> None:
    with pytest.raises(TypeError, match="share index must be an int"):
        Share(index=True, threshold=1, secret_length=0, values=())


# --- combine errors and misuse --------------------------------------------------------------


def test_combine_errors_name_the_problem() -> None:
    a = split(_secret(32), 5, 3)
    with pytest.raises(ValueError, match="at least one share"):
        combine([])
    with pytest.raises(ValueError, match="not enough shares: threshold is 3, got 2"):
        combine(a[:2])
    with pytest.raises(ValueError, match="duplicate share index 2"):
        combine([a[1], a[0], a[1]])
    other_t = split(_secret(32), 5, 2)
    with pytest.raises(ValueError, match="threshold mismatch"):
        combine([a[0], a[1], other_t[2]])
    other_len = split(_secret(33), 5, 3)
    with pytest.raises(ValueError, match="secret length mismatch"):
        combine([a[0], a[1], other_len[2]])
    with pytest.raises(TypeError, match="Share objects"):
        combine([a[0], a[1], a[2].to_bytes()])  # type: ignore[list-item]


def test_two_splits_of_the_same_secret_do_not_mix() -> None:
    secret = _secret(32)
    a = split(secret, 5, 3)
    b = split(secret, 5, 3)
    assert all(x.values != y.values for x, y in zip(a, b, strict=True))  # fresh randomness
    assert combine(a[:3]) == combine(b[2:]) == secret
    # Two shares from one split and one from the other: a random field element comes out,
    # which fits in 32 bytes with probability 2**-265, so combine reports it.
    with pytest.raises(ValueError, match="inconsistent"):
        combine([a[0], a[1], b[2]])
    # A 64-byte chunk leaves fewer spare bits: the result may fit, but is then wrong.
    long_secret = _secret(64)
    c, d = split(long_secret, 3, 2), split(long_secret, 3, 2)
    try:
        mixed = combine([c[0], d[1]])
    except ValueError as err:
        assert "inconsistent" in str(err)
    else:
        assert mixed != long_secret


def test_wrong_but_well_formed_share_gives_wrong_secret_undetected() -> None:
    """Documents the limit: a malicious share can shift the secret by any chosen amount."""
    secret = bytes(31) + b"\x05"
    shares = split(secret, 4, 3)
    used = shares[:3]
    lagrange = _lagrange_at_zero([s.index for s in used], PRIME)
    # Add lagrange^-1 to the last share's value: the reconstructed secret grows by exactly 1.
    bad = Share(
        index=used[2].index,
        threshold=3,
        secret_length=32,
        values=((used[2].values[0] + pow(lagrange[2], -1, PRIME)) % PRIME,),
    )
    assert combine([used[0], used[1], bad]) == bytes(31) + b"\x06"
