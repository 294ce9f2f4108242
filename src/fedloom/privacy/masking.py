"""SecAgg+ masking building blocks: X25519 + HKDF seeds, stream-cipher masks, fixed point.

Seed rule: every seed is used to expand exactly one mask per round; the cipher nonce is fixed
to zero, which is safe only because the seed (key) itself is fresh per round and pair.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PROTOCOL = b"fedloom-secagg+-v1"
_BLOCK = 1 << 20  # uint32 coordinates per streamed block

U32Array = npt.NDArray[np.uint32]


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """Return a fresh X25519 private key and its public key as 32 raw bytes."""
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_context(round_id: int, id_a: int, id_b: int) -> bytes:
    """HKDF info: PROTOCOL | 0x00 | round (8 B BE) | min id (8 B BE) | max id (8 B BE)."""
    lo, hi = sorted((id_a, id_b))
    return PROTOCOL + b"\x00" + b"".join(v.to_bytes(8, "big") for v in (round_id, lo, hi))


def shared_seed(my_private: X25519PrivateKey, their_public: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 (no salt, info=context, 32 bytes) over the X25519 shared secret.

    Raises ValueError for an all-zero shared secret (low-order public key).
    """
    try:
        secret = my_private.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError as exc:  # cryptography refuses all-zero results itself
        raise ValueError("X25519 shared secret is all zero (low-order public key)") from exc
    if secret == bytes(32):
        raise ValueError("X25519 shared secret is all zero (low-order public key)")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(secret)


def _encryptor(seed: bytes, cipher: str) -> CipherContext:
    """A keystream generator for a 32-byte seed: ChaCha20 or AES-256-CTR, zero nonce."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    if cipher == "chacha20":
        return Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    if cipher == "aes-ctr":
        return Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    raise ValueError(f"unknown cipher {cipher!r}")


def expand_mask(seed: bytes, length: int, *, cipher: str = "chacha20") -> U32Array:
    """Keystream of ChaCha20 / AES-256-CTR (zero nonce) under `seed` as little-endian uint32."""
    out = np.zeros(length, dtype="<u4")
    buf = out.data.cast("B")
    enc = _encryptor(seed, cipher)
    enc.update_into(buf, buf)  # in place over the zero buffer: no extra copy
    return out.astype(np.uint32, copy=False)


def apply_masks(
    vector: U32Array,
    plus_seeds: list[bytes],
    minus_seeds: list[bytes],
    *,
    cipher: str = "chacha20",
) -> U32Array:
    """Add masks of plus_seeds and subtract those of minus_seeds, mod 2^32, in place.

    Streams in blocks so only one block of keystream is alive at a time. Returns `vector`.
    """
    if vector.dtype != np.uint32:
        raise TypeError("vector must be uint32")
    encs = [(1, _encryptor(s, cipher)) for s in plus_seeds]
    encs += [(-1, _encryptor(s, cipher)) for s in minus_seeds]
    block = np.empty(min(_BLOCK, len(vector)), dtype="<u4")
    zeros = bytes(block.nbytes)
    for start in range(0, len(vector), _BLOCK):
        n = min(_BLOCK, len(vector) - start)
        view = vector[start : start + n]
        b = block[:n]
        bb = b.data.cast("B")
        for sign, enc in encs:
            enc.update_into(zeros[: n * 4], bb)
            if sign > 0:
                np.add(view, b, out=view)
            else:
                np.subtract(view, b, out=view)
    return vector


def scale_for(clip: float, n_summands: int) -> float:
    """Scale s = (floor((2^32-1)/n) - 1) / (2 clip): an encoding is at most 2 clip s, so n of
    them sum below 2^32 (the one-step margin absorbs float rounding in `encode`).

    Raises ValueError unless clip is finite and > 0 and n_summands is an int >= 1."""
    if not (np.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    if isinstance(n_summands, bool) or not isinstance(n_summands, int) or n_summands < 1:
        raise ValueError(f"n_summands must be an int >= 1, got {n_summands!r}")
    return float((2**32 - 1) // n_summands - 1) / (2.0 * clip)


def encode(values: npt.ArrayLike, clip: float, n_summands: int) -> U32Array:
    """Encode floats in [-clip, clip] as round((v + clip) * s) in uint32.

    Sum of n_summands encodings < 2^32 (no wrap). Raises ValueError naming the first bad index.
    """
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v) | (np.abs(v) > clip)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"value at index {i} ({v[i]}) is NaN/inf or outside [-{clip}, {clip}]")
    s = scale_for(clip, n_summands)
    return np.rint((v + clip) * s).astype(np.uint32)


def decode(sum_u32: U32Array, clip: float, n_summands: int) -> npt.NDArray[np.float64]:
    """Decode a sum of exactly n_summands encodings; error per coordinate <= n/(2s)."""
    s = scale_for(clip, n_summands)
    return sum_u32.astype(np.float64) / s - n_summands * clip
