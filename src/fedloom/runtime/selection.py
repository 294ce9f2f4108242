"""Seeded client selection and per-client seeds: a seed fixes every random choice of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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
