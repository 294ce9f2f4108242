"""FedProx: FedAvg's server step, the proximal weight in every client's fit config."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from fedloom.algorithms import Aggregate, FedProx
from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update


def vec(*values: float) -> Params:
    return Params.from_arrays({"w": np.array(values)}, dtype=np.float64)


@dataclass
class RecordingTrainer:
    """Returns a fixed delta and records the configs it was given."""

    configs: list[FitConfig] = field(default_factory=list)

    def initial_params(self) -> Params:
        return vec(0, 0)

    def fit(self, params: Params, config: FitConfig) -> Update:
        self.configs.append(config)
        return Update(delta=vec(1, -1), num_examples=3, num_steps=2)

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return Evaluation(num_examples=0, metrics={})


def test_client_half_sets_proximal_mu_and_keeps_the_rest() -> None:
    trainer = RecordingTrainer()
    config = FitConfig(round=3, epochs=2, learning_rate=0.5, seed=7)
    update = FedProx(mu=0.25).local.run(trainer, vec(0, 0), config, {}, {})
    (seen,) = trainer.configs
    assert seen.proximal_mu == 0.25
    assert (seen.round, seen.epochs, seen.learning_rate, seen.seed) == (3, 2, 0.5, 7)
    assert config.proximal_mu == 0.0  # the caller's config is untouched
    assert update.delta.allclose(vec(1, -1))


def test_server_update_two_rounds() -> None:
    s = FedProx(mu=0.01, server_lr=0.5)
    state = s.init(vec(1, 2))
    # [1, 2] + 0.5 * [2, -4] = [2, 0]
    state = s.update(state, Aggregate(delta=vec(2, -4), num_clients=2, num_examples=5))
    assert state.params.allclose(vec(2, 0)) and state.round == 1
    # [2, 0] + 0.5 * [-1, 1] = [1.5, 0.5]
    state = s.update(state, Aggregate(delta=vec(-1, 1), num_clients=1, num_examples=1))
    assert state.params.allclose(vec(1.5, 0.5)) and state.round == 2
    assert s.broadcast(state) == {}


def test_update_is_pure() -> None:
    s = FedProx(mu=1.0)
    initial = vec(1, 2)
    state = s.init(initial)
    initial.flat[:] = 0.0
    new = s.update(state, Aggregate(delta=vec(1, 1), num_clients=1, num_examples=1))
    assert state.params.allclose(vec(1, 2)) and state.round == 0
    assert new.params.allclose(vec(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mu": -0.1}, "mu"),
        ({"mu": float("nan")}, "mu"),
        ({"mu": 0.1, "server_lr": 0.0}, "server_lr"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FedProx(**kwargs)


def test_mu_zero_is_allowed() -> None:
    trainer = RecordingTrainer()
    FedProx(mu=0.0).local.run(trainer, vec(0, 0), FitConfig(round=0, proximal_mu=0.5), {}, {})
    assert trainer.configs[0].proximal_mu == 0.0
