"""Shamir secret sharing of byte strings, the building block SecAgg+ uses for seeds and keys.

SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) has every client split its 32-byte mask seed
and its 32-byte X25519 private key among its neighbours, so that the server can recover the
masks of clients that drop out as long as at least ``t`` neighbours answer.

`split` turns a secret into ``n`` shares such that any ``t`` of them give the secret back
(`combine`) and any ``t - 1`` of them are independent of the secret (information-theoretic
secrecy: every candidate secret is consistent with them, equally likely).

Field choice: the prime field GF(p) with the Mersenne prime ``p = 2**521 - 1``. The secret is
cut into chunks of at most 64 bytes (so each chunk, read as a big-endian integer, is below
``2**512 < p``) and every chunk is shared with its own random polynomial of degree ``t - 1``;
party ``i`` gets the evaluations at ``x = i``. Why this field rather than GF(2^8) byte-wise:

- Python integers do prime-field arithmetic natively, so the code is short and easy to check;
  a 32-byte seed or key is a single field element, so one split costs about ``n * t``
  multiplications and one combine about ``t`` (plus ``t`` modular inverses reused across
  chunks), far cheaper in pure Python than ``32 * n * t`` table look-ups in GF(2^8).
- Party indices are field elements, so GF(2^8) would cap ``n`` at 255 parties; here ``n`` can
  go up to 65535 (`MAX_PARTIES`, the limit of the 2-byte index in the encoding).
- The price is size: a share of a 32-byte secret holds one 66-byte element (73 bytes encoded).

Secrets may be empty (zero chunks: shares carry no values and `combine` returns ``b""``) and at
most `MAX_SECRET_BYTES` long. Randomness comes from `secrets` only.

What this module does NOT do: plain Shamir does not authenticate shares. A wrong but
well-formed share (a malicious party, a bit flip) makes `combine` return a wrong secret. When
the reconstructed chunk does not fit its byte length `combine` raises `ValueError`, which catches
most accidental mix-ups (such as shares from two different splits), but that is not an integrity
check: an adversary can shift the secret by any amount it likes. Authenticating shares
(authenticated encryption between clients, signatures) is the protocol's job. `combine` uses the
first ``t`` shares it is given and does not cross-check any extra ones.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHUNK_BYTES",
    "ELEMENT_BYTES",
    "MAX_PARTIES",
    "MAX_SECRET_BYTES",
    "PRIME",
    "Share",
    "combine",
    "split",
]

PRIME = 2**521 - 1
"""The field modulus, a Mersenne prime larger than ``2**512``."""
CHUNK_BYTES = 64
"""Bytes of secret per field element (``256**64 = 2**512 < PRIME``)."""
ELEMENT_BYTES = (PRIME.bit_length() + 7) // 8
"""Bytes per encoded field element (66)."""
MAX_PARTIES = 65535
"""Largest number of parties ``n`` (and largest party index and threshold)."""
MAX_SECRET_BYTES = 4096
"""Longest secret `split` accepts."""

_VERSION = 1
# version, party index, threshold, secret length; all big-endian unsigned.
_HEADER = struct.Struct(">BHHH")


def _num_chunks(secret_length: int) -> int:
    return -(-secret_length // CHUNK_BYTES)


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class Share:
    """One party's share of one secret.

    Attributes:
        index: the party's evaluation point, 1..`MAX_PARTIES` (never 0: f(0) is the secret).
        threshold: how many shares reconstruct the secret, 1..`MAX_PARTIES`.
        secret_length: length of the shared secret in bytes, 0..`MAX_SECRET_BYTES`.
        values: one field element in ``[0, PRIME)`` per 64-byte chunk of the secret.

    Construction validates every field and raises `ValueError` (or `TypeError` for a wrong
    type) naming the field that is wrong.
    """

    index: int
    threshold: int
    secret_length: int
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_int("share index", self.index, 1, MAX_PARTIES)
        _check_int("share threshold", self.threshold, 1, MAX_PARTIES)
        _check_int("share secret length", self.secret_length, 0, MAX_SECRET_BYTES)
        if not isinstance(self.values, tuple):
            raise TypeError(f"share values must be a tuple, got {type(self.values).__name__}")
        expected = _num_chunks(self.secret_length)
        if len(self.values) != expected:
            raise ValueError(
                f"share values: a {self.secret_length}-byte secret needs {expected} "
                f"field elements, got {len(self.values)}"
            )
        for k, v in enumerate(self.values):
            _check_int(f"share value {k}", v, 0, PRIME - 1)

    def to_bytes(self) -> bytes:
        """Encode as ``version | index | threshold | secret_length | values``.

        The header is 7 bytes (1-byte version, then three big-endian uint16); each value
        follows as a big-endian `ELEMENT_BYTES`-byte integer. `Share.from_bytes` inverts it.
        """
        head = _HEADER.pack(_VERSION, self.index, self.threshold, self.secret_length)
        return head + b"".join(v.to_bytes(ELEMENT_BYTES, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode the output of `Share.to_bytes`.

        Raises `ValueError` naming the problem for a short header, an unknown version, a
        total length that does not match the secret length, or any field out of range.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"share encoding must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) < _HEADER.size:
            raise ValueError(
                f"share encoding too short for its {_HEADER.size}-byte header: {len(raw)} bytes"
            )
        version, index, threshold, secret_length = _HEADER.unpack_from(raw)
        if version != _VERSION:
            raise ValueError(f"share encoding has unknown version {version} (expected {_VERSION})")
        if secret_length > MAX_SECRET_BYTES:
            raise ValueError(
                f"share secret length must be in [0, {MAX_SECRET_BYTES}], got {secret_length}"
            )
        chunks = _num_chunks(secret_length)
        expected = _HEADER.size + chunks * ELEMENT_BYTES
        if len(raw) != expected:
            raise ValueError(
                f"share encoding length {len(raw)} does not match a {secret_length}-byte "
                f"secret (expected {expected} bytes)"
            )
        values = tuple(
            int.from_bytes(raw[o : o + ELEMENT_BYTES], "big")
            for o in range(_HEADER.size, expected, ELEMENT_BYTES)
        )
        return cls(index=index, threshold=threshold, secret_length=secret_length, values=values)


def _eval_poly(coeffs: Sequence[int], x: int, prime: int) -> int:
    """Evaluate ``sum(coeffs[k] * x**k) mod prime`` by Horner's rule."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % prime
    return acc


def _split_elements(elements: Sequence[int], n: int, t: int, prime: int) -> list[list[int]]:
    """Share each field element with a fresh uniform polynomial of degree ``t - 1``.

    Returns ``result[i - 1][k]``: party ``i``'s share of ``elements[k]``. ``prime`` is a
    parameter so that tests can check the distribution exhaustively in a tiny field.
    """
    per_party: list[list[int]] = [[] for _ in range(n)]
    for secret in elements:
        coeffs = [secret] + [secrets.randbelow(prime) for _ in range(t - 1)]
        for i in range(n):
            per_party[i].append(_eval_poly(coeffs, i + 1, prime))
    return per_party


def _lagrange_at_zero(xs: Sequence[int], prime: int) -> list[int]:
    """Coefficients ``l_j`` with ``f(0) = sum(l_j * f(xs[j]))`` for any ``f`` of degree < len(xs).

    ``xs`` must be distinct and nonzero modulo ``prime``.
    """
    coeffs = []
    for j, xj in enumerate(xs):
        num = 1
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        coeffs.append(num * pow(den, -1, prime) % prime)
    return coeffs


def split(secret: bytes, n: int, t: int) -> list[Share]:
    """Split ``secret`` into ``n`` shares, any ``t`` of which reconstruct it.

    Args:
        secret: 0..`MAX_SECRET_BYTES` bytes (any bytes-like object).
        n: number of parties, 1..`MAX_PARTIES`; share ``i`` (index ``i``, 1..n) goes to party i.
        t: threshold, 1 <= t <= n. Fewer than ``t`` shares reveal nothing about the secret
            (beyond its length); ``t == 1`` means every share alone reveals it.

    Returns:
        ``n`` `Share` objects in index order, built from fresh randomness (`secrets`): two
        splits of the same secret give unrelated shares.

    Raises:
        ValueError: ``n`` or ``t`` out of range, or the secret too long.
        TypeError: ``secret`` is not bytes-like, or ``n``/``t`` not ints.
    """
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    data = bytes(secret)
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(
            f"secret is {len(data)} bytes, more than MAX_SECRET_BYTES={MAX_SECRET_BYTES}"
        )
    _check_int("n", n, 1, MAX_PARTIES)
    _check_int("threshold t", t, 1, n)
    elements = [
        int.from_bytes(data[o : o + CHUNK_BYTES], "big") for o in range(0, len(data), CHUNK_BYTES)
    ]
    per_party = _split_elements(elements, n, t, PRIME)
    return [
        Share(index=i + 1, threshold=t, secret_length=len(data), values=tuple(vals))
        for i, vals in enumerate(per_party)
    ]


def combine(shares: Sequence[Share]) -> bytes:
    """Reconstruct the secret from at least ``threshold`` shares of one `split`.

    All shares are validated; the first ``threshold`` of them are used, extra ones are not
    cross-checked. Plain Shamir cannot tell a wrong-but-well-formed share from a right one: such
    a share yields a wrong secret (see the module docstring).

    Raises:
        TypeError: an item is not a `Share`.
        ValueError: no shares; shares disagree on threshold or secret length; duplicate party
            indices; fewer shares than the threshold; or a reconstructed chunk that does not fit
            its byte length (the shares are inconsistent, e.g. from different splits).
    """
    if len(shares) == 0:
        raise ValueError("combine needs at least one share, got none")
    for s in shares:
        if not isinstance(s, Share):
            raise TypeError(f"combine expects Share objects, got {type(s).__name__}")
    first = shares[0]
    t, length = first.threshold, first.secret_length
    seen: set[int] = set()
    for s in shares:
        if s.threshold != t:
            raise ValueError(f"threshold mismatch: shares have thresholds {t} and {s.threshold}")
        if s.secret_length != length:
            raise ValueError(
                f"secret length mismatch: shares have lengths {length} and {s.secret_length}"
            )
        if s.index in seen:
            raise ValueError(f"duplicate share index {s.index}")
        seen.add(s.index)
    if len(shares) < t:
        raise ValueError(f"not enough shares: threshold is {t}, got {len(shares)}")
    used = shares[:t]
    lagrange = _lagrange_at_zero([s.index for s in used], PRIME)
    out = bytearray()
    for k in range(_num_chunks(length)):
        value = sum(c * s.values[k] for c, s in zip(lagrange, used, strict=True)) % PRIME
        chunk_len = min(CHUNK_BYTES, length - k * CHUNK_BYTES)
        if value >> (8 * chunk_len):
            raise ValueError(
                f"reconstructed chunk {k} does not fit in {chunk_len} bytes: the shares are "
                "inconsistent (from different splits, or corrupted)"
            )
        out += value.to_bytes(chunk_len, "big")
    return bytes(out)
