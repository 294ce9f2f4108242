"""Seeded client selection and per-client seeds: a seed fixes every random choice of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


class SelectionError(RuntimeError):
    """Too few clients are available to meet the configured minimum."""


def round_rng(
    seed: int, round_number: int, attempt: int = 0, stream: int = 0
) -> np.random.Generator:
    """The generator for one purpose (`stream`) of one attempt of one round of a run."""
    return np.random.default_rng([seed, round_number, attempt, stream])


def client_seed(seed: int, round_number: int, client_index: int) -> int:
    """A 31-bit local seed for one client in one round, independent of who else was picked."""
    state = np.random.SeedSequence([seed, round_number, client_index, 7]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


_U32 = np.uint32
_INIT_A, _MULT_A = _U32(0x43B0D7E5), _U32(0x931E8875)  # NumPy's SeedSequence constants
_INIT_B, _MULT_B = _U32(0x8B51F9DD), _U32(0x58F38DED)
_MIX_L, _MIX_R = _U32(0xCA01F9DD), _U32(0x4973F715)


def client_seeds(seed: int, round_number: int, client_indices: Sequence[int]) -> list[int]:
    """`[client_seed(seed, round_number, i) for i in client_indices]`, computed for all clients
    at once (about 10x faster for 100 clients): NumPy's `SeedSequence` pool mixing and first
    output word, vectorized over the client index. Falls back to `client_seed` for values
    that do not fit one 32-bit entropy word."""
    if not (0 <= seed < 2**32 and 0 <= round_number < 2**32) or any(
        not 0 <= i < 2**32 for i in client_indices
    ):
        return [client_seed(seed, round_number, i) for i in client_indices]
    n = len(client_indices)
    words = [
        np.full(n, seed, _U32),
        np.full(n, round_number, _U32),
        np.asarray(client_indices, dtype=_U32),
        np.full(n, 7, _U32),
    ]
    const = _INIT_A

    def hashmix(value: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        nonlocal const
        value = value ^ const
        const = _U32(const * _MULT_A)
        value = value * const
        return value ^ (value >> _U32(16))

    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as in SeedSequence
        pool = [hashmix(w) for w in words]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    mixed = _MIX_L * pool[dst] - _MIX_R * hashmix(pool[src])
                    pool[dst] = mixed ^ (mixed >> _U32(16))
        out = (pool[0] ^ _INIT_B) * _U32(_INIT_B * _MULT_B)
        out ^= out >> _U32(16)
    return [int(v) for v in out & _U32(0x7FFFFFFF)]


def sample_size(num_available: int, fraction: float, minimum: int) -> int:
    """max(minimum, ceil(fraction * num_available)), capped at `num_available`.

    Raises `SelectionError` if fewer than `minimum` clients are available.
    """
    if num_available < minimum:
        raise SelectionError(f"{num_available} clients available, at least {minimum} required")
    wanted = max(minimum, math.ceil(fraction * num_available - 1e-9))
    return min(wanted, num_available)


def select_clients(
    available: Sequence[str], fraction: float, minimum: int, rng: np.random.Generator
) -> list[str]:
    """A uniformly random subset of `available` of size `sample_size(...)`, in drawn order."""
    n = sample_size(len(available), fraction, minimum)
    if n == 0:
        return []
    picks = rng.choice(len(available), size=n, replace=False)
    return [available[int(i)] for i in picks]
