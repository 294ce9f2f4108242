import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedloom.privacy.masking import (
    apply_masks,
    decode,
    encode,
    expand_mask,
    generate_keypair,
    pair_context,
    scale_for,
    shared_seed,
)


def test_seed_agreement_and_binding() -> None:
    a, pa = generate_keypair()
    b, pb = generate_keypair()
    _c, pc = generate_keypair()
    s = shared_seed(a, pb, pair_context(1, 3, 7))
    assert s == shared_seed(b, pa, pair_context(1, 7, 3))
    assert len(s) == 32
    assert s != shared_seed(a, pb, pair_context(2, 3, 7))
    assert s != shared_seed(a, pb, pair_context(1, 4, 7))
    assert s != shared_seed(a, pb, pair_context(1, 3, 8))
    assert s != shared_seed(a, pc, pair_context(1, 3, 7))


def test_low_order_key_refused() -> None:
    a, _ = generate_keypair()
    with pytest.raises(ValueError, match="all zero"):
        shared_seed(a, bytes(32), b"ctx")


def test_masks_cancel() -> None:
    rng = np.random.default_rng(0)
    n, d, clip = 7, 10_000, 1.5
    keys = [generate_keypair() for _ in range(n)]
    xs = rng.uniform(-clip, clip, size=(n, d))
    enc = [encode(x, clip, n) for x in xs]
    total_plain = np.zeros(d, np.uint32)
    total_masked = np.zeros(d, np.uint32)
    for i in range(n):
        seeds = {
            j: shared_seed(keys[i][0], keys[j][1], pair_context(5, i, j))
            for j in range(n)
            if j != i
        }
        masked = apply_masks(
            enc[i].copy(), [seeds[j] for j in seeds if j > i], [seeds[j] for j in seeds if j < i]
        )
        assert not np.array_equal(masked, enc[i])
        total_masked += masked
        total_plain += enc[i]
    assert np.array_equal(total_masked, total_plain)
    err = np.abs(decode(total_masked, clip, n) - xs.sum(axis=0))
    assert err.max() <= n / (2 * scale_for(clip, n)) + 1e-9


def _chi2_top_byte(v: np.ndarray) -> float:
    counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
    exp = len(v) / 256
    return float(((counts - exp) ** 2 / exp).sum())


def test_masked_uniform_unmasked_not() -> None:
    d, clip = 1 << 20, 1.0
    x = encode(np.linspace(-0.5, 0.5, d), clip, 10)
    masked = apply_masks(x.copy(), [bytes(range(32))], [])
    crit = 330.5  # chi2 255 dof, p = 0.001
    assert _chi2_top_byte(masked) < crit
    assert _chi2_top_byte(x) > crit


@pytest.mark.parametrize("cipher", ["chacha20", "aes-ctr"])
def test_cipher_determinism(cipher: str) -> None:
    s1, s2 = bytes(32), bytes([1] * 32)
    assert np.array_equal(
        expand_mask(s1, 1000, cipher=cipher), expand_mask(s1, 1000, cipher=cipher)
    )
    assert not np.array_equal(
        expand_mask(s1, 1000, cipher=cipher), expand_mask(s2, 1000, cipher=cipher)
    )


def test_aes_ctr_matches_library() -> None:
    seed = bytes(range(32))
    e = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(e.update(bytes(4000)), dtype="<u4")
    assert np.array_equal(expand_mask(seed, 1000, cipher="aes-ctr"), ref)


def test_encode_extremes_no_wrap() -> None:
    n, clip, d = 100, 2.0, 1000
    for val in (clip, -clip):
        e = encode(np.full(d, val), clip, n)
        tot = e.astype(np.uint64) * n
        assert tot.max() < 2**32
        dec = decode((e * np.uint32(n)).astype(np.uint32), clip, n)
        assert np.abs(dec - n * val).max() <= n / (2 * scale_for(clip, n))
    rng = np.random.default_rng(1)
    xs = rng.uniform(-clip, clip, size=(n, d))
    tot32 = sum((encode(x, clip, n) for x in xs), np.zeros(d, np.uint32))
    assert np.abs(decode(tot32, clip, n) - xs.sum(0)).max() <= n / (2 * scale_for(clip, n))


def test_encode_rejects() -> None:
    with pytest.raises(ValueError, match="index 2"):
        encode(np.array([0.0, 0.1, 1.5]), 1.0, 2)
    with pytest.raises(ValueError, match="index 1"):
        encode(np.array([0.0, np.nan]), 1.0, 2)


def test_scale_uses_the_whole_ring_and_refuses_bad_arguments() -> None:
    n, clip = 100, 1.0
    top = encode(np.full(3, clip), clip, n).astype(np.uint64)
    assert int(top.max()) * n < 2**32  # n encodings of +clip fit without wrapping
    assert int(top.max()) * n > 2**32 - 2 * n  # and nearly fill the ring: no bit left unused
    for bad_clip in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip"):
            scale_for(bad_clip, n)
    for bad_n in (0, -3, True):
        with pytest.raises(ValueError, match="n_summands"):
            scale_for(clip, bad_n)
