"""FedAvg against hand-computed weighted means."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms import Aggregate, FedAvg, PlainLocal
from fedloom.core.params import Params


def vec(*values: float) -> Params:
    return Params.from_arrays({"w": np.array(values)}, dtype=np.float64)


def weighted_mean_aggregate(deltas: list[Params], examples: list[int]) -> Aggregate:
    """What the runtime's aggregator produces: sum(n_i * d_i) / sum(n_i)."""
    total = sum(examples)
    acc = Params.zeros(deltas[0].layout)
    for d, n in zip(deltas, examples, strict=True):
        acc.add_scaled_(d, n / total)
    return Aggregate(delta=acc, num_clients=len(deltas), num_examples=total)


# Three clients, 1, 2 and 1 examples:
#   (1*[1, 0, -2] + 2*[4, 3, 1] + 1*[-2, 6, 4]) / 4 = [7, 12, 4] / 4 = [1.75, 3, 1]
DELTAS = [vec(1, 0, -2), vec(4, 3, 1), vec(-2, 6, 4)]
EXAMPLES = [1, 2, 1]


def test_aggregate_is_the_hand_computed_weighted_mean() -> None:
    agg = weighted_mean_aggregate(DELTAS, EXAMPLES)
    assert agg.delta.allclose(vec(1.75, 3, 1))
    assert (agg.num_clients, agg.num_examples) == (3, 4)


def test_update_adds_weighted_mean_delta() -> None:
    strategy = FedAvg()
    state = strategy.init(vec(1, 1, 1))
    state = strategy.update(state, weighted_mean_aggregate(DELTAS, EXAMPLES))
    # [1, 1, 1] + [1.75, 3, 1]
    assert state.params.allclose(vec(2.75, 4, 2))
    assert state.round == 1
    # Round 2, two clients with 3 and 1 examples: (3*[1, 1, 1] + [-3, 1, 5]) / 4 = [0, 1, 2]
    state = strategy.update(state, weighted_mean_aggregate([vec(1, 1, 1), vec(-3, 1, 5)], [3, 1]))
    assert state.params.allclose(vec(2.75, 5, 4))
    assert state.round == 2


def test_server_lr_scales_the_step() -> None:
    strategy = FedAvg(server_lr=0.5)
    state = strategy.update(strategy.init(vec(1, 1, 1)), weighted_mean_aggregate(DELTAS, EXAMPLES))
    # [1, 1, 1] + 0.5 * [1.75, 3, 1]
    assert state.params.allclose(vec(1.875, 2.5, 1.5))


def test_state_and_inputs_are_not_mutated() -> None:
    initial = vec(1, 1, 1)
    strategy = FedAvg()
    state = strategy.init(initial)
    initial.flat[:] = 100.0  # init took a private copy
    assert state.params.allclose(vec(1, 1, 1))
    agg = weighted_mean_aggregate(DELTAS, EXAMPLES)
    new = strategy.update(state, agg)
    assert state.params.allclose(vec(1, 1, 1)) and state.round == 0
    assert agg.delta.allclose(vec(1.75, 3, 1))
    assert new.params is not state.params


def test_defaults_and_broadcast() -> None:
    strategy = FedAvg()
    assert isinstance(strategy.local, PlainLocal)
    assert strategy.broadcast(strategy.init(vec(0.0))) == {}


@pytest.mark.parametrize("server_lr", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_server_lr_is_refused(server_lr: float) -> None:
    with pytest.raises(ValueError, match="server_lr must be a finite number > 0"):
        FedAvg(server_lr=server_lr)
