"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) against hand-computed steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedloom.algorithms import (
    Aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    PlainLocal,
    ServerState,
)
from fedloom.core.params import Params


def vec(*values: float, dtype: type = np.float64) -> Params:
    return Params.from_arrays({"w": np.array(values)}, dtype=dtype)


def agg(*values: float) -> Aggregate:
    return Aggregate(delta=vec(*values), num_clients=2, num_examples=10)


def close(p: Params, *expected: float) -> bool:
    return bool(np.allclose(p.flat, expected, rtol=1e-12, atol=1e-12))


def test_fedavgm_two_rounds() -> None:
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    state = s.init(vec(0, 0))
    # m1 = [1, -2]; w1 = 0.5 * m1
    state = s.update(state, agg(1, -2))
    assert close(state.slots["momentum"], 1, -2) and close(state.params, 0.5, -1)
    # m2 = 0.9 * [1, -2] + [2, 2] = [2.9, 0.2]; w2 = [0.5, -1] + 0.5 * m2 = [1.95, -0.9]
    state = s.update(state, agg(2, 2))
    assert close(state.slots["momentum"], 2.9, 0.2) and close(state.params, 1.95, -0.9)
    assert state.round == 2


def test_fedavgm_without_momentum_is_fedavg() -> None:
    a, b = FedAvgM(momentum=0.0), FedAvg()
    sa, sb = a.init(vec(1, 2, 3)), b.init(vec(1, 2, 3))
    for d in [(0.5, -1, 2), (3, 0, -0.25)]:
        sa, sb = a.update(sa, agg(*d)), b.update(sb, agg(*d))
    assert sa.params.allclose(sb.params)


def test_fedadagrad_two_rounds() -> None:
    s = FedAdagrad(server_lr=1.0, beta1=0.5, tau=3.0)  # v0 = tau^2 = 9
    state = s.init(vec(0, 0))
    # m1 = 0.5 * [4, -4] = [2, -2]; v1 = 9 + 16 = 25; w1 = [2, -2] / (5 + 3)
    state = s.update(state, agg(4, -4))
    assert close(state.slots["second_moment"], 25, 25)
    assert close(state.params, 0.25, -0.25)
    # m2 = 0.5 * [2, -2] + 0.5 * [0, 12] = [1, 5]; v2 = [25, 25 + 144] = [25, 169]
    # w2 = [0.25 + 1 / (5 + 3), -0.25 + 5 / (13 + 3)] = [0.375, 0.0625]
    state = s.update(state, agg(0, 12))
    assert close(state.slots["momentum"], 1, 5) and close(state.slots["second_moment"], 25, 169)
    assert close(state.params, 0.375, 0.0625)


def test_fedadam_two_rounds() -> None:
    s = FedAdam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)  # v0 = 1
    state = s.init(vec(0, 0))
    # m1 = [3.5, 0.5]; v1 = 0.5 * 1 + 0.5 * [49, 1] = [25, 1]; w1 = [3.5 / 6, 0.5 / 2]
    state = s.update(state, agg(7, 1))
    assert close(state.slots["second_moment"], 25, 1) and close(state.params, 7 / 12, 0.25)
    # m2 = 0.5 * [3.5, 0.5] + 0.5 * [-5, 7] = [-0.75, 3.75]
    # v2 = 0.5 * [25, 1] + 0.5 * [25, 49] = [25, 25]
    # w2 = [7/12 - 0.75 / 6, 0.25 + 3.75 / 6] = [11/24, 0.875]
    state = s.update(state, agg(-5, 7))
    assert close(state.slots["momentum"], -0.75, 3.75)
    assert close(state.slots["second_moment"], 25, 25)
    assert close(state.params, 11 / 24, 0.875)


def test_fedyogi_two_rounds_both_branches_of_the_sign() -> None:
    s = FedYogi(server_lr=1.0, beta1=0.5, beta2=0.5, tau=2.0)  # v0 = 4
    state = s.init(vec(0, 0))
    # Delta1 = [8, 1], Delta1^2 = [64, 1]. m1 = [4, 0.5]
    # v1[0]: 4 - 64 < 0, so v grows: 4 + 0.5 * 64 = 36
    # v1[1]: 4 - 1 > 0, so v shrinks: 4 - 0.5 * 1 = 3.5
    # w1 = [4 / (6 + 2), 0.5 / (sqrt(3.5) + 2)]
    state = s.update(state, agg(8, 1))
    w1 = 0.5 / (math.sqrt(3.5) + 2)
    assert close(state.slots["second_moment"], 36, 3.5) and close(state.params, 0.5, w1)
    # Delta2 = [2, 4], Delta2^2 = [4, 16]. m2 = 0.5 * m1 + 0.5 * Delta2 = [3, 2.25]
    # v2[0]: 36 - 4 > 0: 36 - 0.5 * 4 = 34 (Adam would give 0.5 * 36 + 0.5 * 4 = 20)
    # v2[1]: 3.5 - 16 < 0: 3.5 + 0.5 * 16 = 11.5
    state = s.update(state, agg(2, 4))
    assert close(state.slots["momentum"], 3, 2.25)
    assert close(state.slots["second_moment"], 34, 11.5)
    assert close(state.params, 0.5 + 3 / (math.sqrt(34) + 2), w1 + 2.25 / (math.sqrt(11.5) + 2))


ALL = [FedAvgM, FedAdagrad, FedAdam, FedYogi]


@pytest.mark.parametrize("cls", ALL)
def test_update_is_pure(cls: type) -> None:
    s = cls()
    state: ServerState = s.update(s.init(vec(1, 2)), agg(0.5, -0.5))  # non-trivial slots
    before = {k: v.flat.copy() for k, v in state.slots.items()}
    params_before = state.params.flat.copy()
    aggregate = agg(1, 3)
    new = s.update(state, aggregate)
    assert np.array_equal(state.params.flat, params_before) and state.round == 1
    assert all(np.array_equal(state.slots[k].flat, v) for k, v in before.items())
    assert close(aggregate.delta, 1, 3)
    assert new.round == 2 and not new.params.allclose(state.params)
    assert s.broadcast(new) == {} and isinstance(s.local, PlainLocal)


@pytest.mark.parametrize("cls", ALL)
def test_float32_stays_float32(cls: type) -> None:
    s = cls()
    state = s.init(vec(1, 2, dtype=np.float32))
    d = Aggregate(delta=vec(0.5, -1, dtype=np.float32), num_clients=1, num_examples=1)
    state = s.update(state, d)
    assert state.params.flat.dtype == np.float32
    assert all(v.flat.dtype == np.float32 for v in state.slots.values())


def test_adaptive_init_slots_and_paper_defaults() -> None:
    s = FedAdam()
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (1e-2, 0.9, 0.99, 1e-3)
    state = s.init(vec(5, 6))
    assert close(state.slots["momentum"], 0, 0) and close(state.slots["second_moment"], 1e-6, 1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (FedAvgM, {"momentum": 1.0}, "momentum"),
        (FedAvgM, {"momentum": -0.1}, "momentum"),
        (FedAvgM, {"server_lr": 0.0}, "server_lr"),
        (FedAdagrad, {"tau": 0.0}, "tau"),
        (FedAdagrad, {"beta1": 1.0}, "beta1"),
        (FedAdam, {"beta2": 1.5}, "beta2"),
        (FedAdam, {"server_lr": -1.0}, "server_lr"),
        (FedYogi, {"beta2": -0.5}, "beta2"),
        (FedYogi, {"tau": float("nan")}, "tau"),
        (FedYogi, {"server_lr": float("inf")}, "server_lr"),
    ],
)
def test_invalid_hyperparameters_are_rejected(
    cls: type, kwargs: dict[str, float], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_adagrad_has_no_beta2() -> None:
    with pytest.raises(TypeError):
        FedAdagrad(beta2=0.9)  # type: ignore[call-arg]
