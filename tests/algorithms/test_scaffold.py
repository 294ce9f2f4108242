"""SCAFFOLD (both halves) against hand-computed values, and every strategy on a toy problem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms import (
    Aggregate,
    ClientState,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    ScaffoldLocal,
    ServerState,
)
from fedloom.core.params import FloatArray, Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update


def vec(*values: float) -> Params:
    return Params.from_arrays({"w": np.array(values)}, dtype=np.float64)


@dataclass
class QuadraticTrainer:
    """Client loss 0.5 * sum(curvature * (w - target)^2), `steps` plain GD steps per fit.

    Step gradient: curvature * (w - target) + gradient_correction + mu * (w - w_global).
    """

    target: FloatArray
    curvature: FloatArray
    steps: int
    num_examples: int = 1

    def initial_params(self) -> Params:
        return Params.zeros(vec(*self.target).layout)

    def fit(self, params: Params, config: FitConfig) -> Update:
        w0 = params.flat
        c = 0.0 if config.gradient_correction is None else config.gradient_correction.flat
        w = w0.copy()
        for _ in range(self.steps):
            g = self.curvature * (w - self.target) + c + config.proximal_mu * (w - w0)
            w = w - config.learning_rate * g
        return Update(params.with_flat(w - w0), self.num_examples, num_steps=self.steps)

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return Evaluation(self.num_examples, {})


def aggregate(updates: list[Update]) -> Aggregate:
    """Example-weighted mean delta, unweighted mean extras (the `Aggregate` contract)."""
    total = sum(u.num_examples for u in updates)
    delta = Params.zeros(updates[0].delta.layout)
    for u in updates:
        delta.add_scaled_(u.delta, u.num_examples / total)
    extras = {}
    for name in updates[0].extras:
        extras[name] = Params.zeros(delta.layout)
        for u in updates:
            extras[name].add_scaled_(u.extras[name], 1 / len(updates))
    return Aggregate(delta, num_clients=len(updates), num_examples=total, extras=extras)


def run_round(
    strategy: Any,
    state: ServerState,
    clients: list[tuple[QuadraticTrainer, ClientState]],
    lr: float,
) -> ServerState:
    config = FitConfig(round=state.round, learning_rate=lr)
    broadcast = strategy.broadcast(state)
    updates = [strategy.local.run(t, state.params, config, broadcast, cs) for t, cs in clients]
    new: ServerState = strategy.update(state, aggregate(updates))
    return new


# -- client half, by hand ----------------------------------------------------------------------
def test_client_half_two_rounds_by_hand() -> None:
    trainer = QuadraticTrainer(np.array([2.0, -1.0]), np.ones(2), steps=2)
    state: ClientState = {}
    config = FitConfig(round=0, learning_rate=0.5)
    # Round 1: x = [0, 0], c = [0.5, 0], c_i = 0, so the correction is [0.5, 0].
    #   step 1: raw grad [-2, 1]     -> g = [-1.5, 1]     -> w = [0.75, -0.5]
    #   step 2: raw grad [-1.25, 0.5] -> g = [-0.75, 0.5] -> w = [1.125, -0.75]
    # c_i+ = 0 - [0.5, 0] - [1.125, -0.75] / (2 * 0.5) = [-1.625, 0.75] (= mean raw grad)
    u = ScaffoldLocal().run(trainer, vec(0, 0), config, {"control": vec(0.5, 0)}, state)
    assert u.delta.allclose(vec(1.125, -0.75)) and u.num_steps == 2
    assert state["control"].allclose(vec(-1.625, 0.75))
    assert u.extras["control_delta"].allclose(vec(-1.625, 0.75))
    # Round 2: x = [1, 0], c = [0.25, 0.25]; correction = c - c_i = [1.875, -0.5].
    #   step 1: raw [-1, 1]          -> g = [0.875, 0.5]  -> w = [0.5625, -0.25]
    #   step 2: raw [-1.4375, 0.75]  -> g = [0.4375, 0.25] -> w = [0.34375, -0.375]
    # delta = [-0.65625, -0.375]
    # c_i+ = [-1.625, 0.75] - [0.25, 0.25] + [0.65625, 0.375] = [-1.21875, 0.875]
    u = ScaffoldLocal().run(trainer, vec(1, 0), config, {"control": vec(0.25, 0.25)}, state)
    assert u.delta.allclose(vec(-0.65625, -0.375))
    assert state["control"].allclose(vec(-1.21875, 0.875))
    assert u.extras["control_delta"].allclose(vec(0.40625, 0.125))


def test_client_half_does_not_mutate_its_inputs() -> None:
    trainer = QuadraticTrainer(np.array([2.0, -1.0]), np.ones(2), steps=3)
    params, c, c_i = vec(1, 1), vec(0.5, -0.5), vec(0.25, 0.25)
    state: ClientState = {"control": c_i}
    config = FitConfig(round=0, learning_rate=0.1)
    ScaffoldLocal().run(trainer, params, config, {"control": c}, state)
    assert params.allclose(vec(1, 1)) and c.allclose(vec(0.5, -0.5))
    assert c_i.allclose(vec(0.25, 0.25)) and state["control"] is not c_i
    assert config.gradient_correction is None


def test_client_half_errors() -> None:
    config = FitConfig(round=0, learning_rate=0.1)
    zero_steps = QuadraticTrainer(np.zeros(2), np.ones(2), steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        ScaffoldLocal().run(zero_steps, vec(0, 0), config, {"control": vec(0, 0)}, {})
    one_step = QuadraticTrainer(np.zeros(2), np.ones(2), steps=1)
    with pytest.raises(ValueError, match="control"):
        ScaffoldLocal().run(one_step, vec(0, 0), config, {}, {})
    assert ScaffoldLocal().extra_names == ("control_delta",)


# -- server half, by hand ----------------------------------------------------------------------
def test_server_two_rounds_by_hand() -> None:
    s = Scaffold(num_clients=4)
    state = s.init(vec(1, 2))
    assert s.broadcast(state)["control"].allclose(vec(0, 0))
    # 2 of 4 clients: x = [1, 2] + [0.5, -1]; c = 0 + 2/4 * [0.4, -0.8] = [0.2, -0.4]
    extras = {"control_delta": vec(0.4, -0.8)}
    state = s.update(state, Aggregate(vec(0.5, -1), 2, 20, extras=extras))
    assert state.params.allclose(vec(1.5, 1)) and state.slots["control"].allclose(vec(0.2, -0.4))
    # 1 of 4 clients: x = [1.5, 1] + [-1, 1]; c = [0.2, -0.4] + 1/4 * [1.2, 0.4] = [0.5, -0.3]
    extras = {"control_delta": vec(1.2, 0.4)}
    state = s.update(state, Aggregate(vec(-1, 1), 1, 5, extras=extras))
    assert state.params.allclose(vec(0.5, 2)) and state.slots["control"].allclose(vec(0.5, -0.3))
    assert state.round == 2 and s.broadcast(state)["control"].allclose(vec(0.5, -0.3))


def test_server_lr_scales_only_the_model_step() -> None:
    s = Scaffold(num_clients=2, server_lr=0.5)
    extras = {"control_delta": vec(1, 1)}
    state = s.update(s.init(vec(1, 2)), Aggregate(vec(0.5, -1), 2, 2, extras=extras))
    assert state.params.allclose(vec(1.25, 1.5)) and state.slots["control"].allclose(vec(1, 1))


def test_server_is_pure() -> None:
    s = Scaffold(num_clients=2)
    state = s.init(vec(1, 2))
    s.broadcast(state)["control"].flat[:] = 9.0  # a broadcast is a copy
    agg = Aggregate(vec(1, 1), 1, 1, extras={"control_delta": vec(2, 2)})
    new = s.update(state, agg)
    assert state.params.allclose(vec(1, 2)) and state.slots["control"].allclose(vec(0, 0))
    assert state.round == 0 and new.slots["control"].allclose(vec(1, 1))


def test_server_errors() -> None:
    with pytest.raises(ValueError, match="num_clients"):
        Scaffold(num_clients=0)
    with pytest.raises(ValueError, match="server_lr"):
        Scaffold(num_clients=3, server_lr=0.0)
    s = Scaffold(num_clients=1)
    with pytest.raises(ValueError, match="control_delta"):
        s.update(s.init(vec(0)), Aggregate(vec(1), 1, 1))
    with pytest.raises(ValueError, match="num_clients"):
        s.update(s.init(vec(0)), Aggregate(vec(1), 2, 2, extras={"control_delta": vec(1)}))


# -- properties and convergence on a heterogeneous quadratic problem -----------------------------
def make_clients(seed: int, n: int, steps: int, examples: bool = False) -> list[QuadraticTrainer]:
    rng = np.random.default_rng(seed)
    return [
        QuadraticTrainer(
            target=rng.normal(0, 3, size=3),
            curvature=rng.uniform(0.2, 4.0, size=3),
            steps=steps,
            num_examples=int(rng.integers(1, 10)) if examples else 10,
        )
        for _ in range(n)
    ]


def optimum_and_loss(clients: list[QuadraticTrainer]) -> tuple[FloatArray, Any]:
    """Minimiser of the example-weighted mean client loss, and that loss as a function."""
    n = np.array([t.num_examples for t in clients], dtype=float)
    a = np.array([t.curvature for t in clients])
    t = np.array([t.target for t in clients])
    w_star = (n[:, None] * a * t).sum(0) / (n[:, None] * a).sum(0)

    def loss(w: FloatArray) -> float:
        return float((n[:, None] * 0.5 * a * (w - t) ** 2).sum() / n.sum())

    return w_star, loss


@pytest.mark.parametrize("seed", range(5))
def test_first_scaffold_round_equals_fedavg(seed: int) -> None:
    clients = make_clients(seed, n=3, steps=5, examples=True)
    w0 = vec(*np.random.default_rng(100 + seed).normal(size=3))
    sa, sf = Scaffold(num_clients=3), FedAvg()
    a = run_round(sa, sa.init(w0), [(t, {}) for t in clients], lr=0.1)
    f = run_round(sf, sf.init(w0), [(t, {}) for t in clients], lr=0.1)
    assert a.params.allclose(f.params, rtol=1e-12, atol=1e-12)


def test_server_control_is_mean_of_client_controls_under_partial_participation() -> None:
    clients: list[tuple[QuadraticTrainer, ClientState]] = [
        (t, {}) for t in make_clients(1, n=4, steps=3)
    ]
    s = Scaffold(num_clients=4)
    state = s.init(vec(0, 0, 0))
    for r in range(6):
        picked: list[tuple[QuadraticTrainer, ClientState]] = [clients[r % 4], clients[(r + 1) % 4]]
        state = run_round(s, state, picked, lr=0.1)
    mean_ci = sum((cs["control"].flat for _, cs in clients), np.zeros(3)) / 4
    assert np.allclose(state.slots["control"].flat, mean_ci, atol=1e-12)


STRATEGIES: list[Any] = [
    FedAvg(),
    FedAvgM(server_lr=1.0, momentum=0.5),
    FedAdagrad(server_lr=0.3),
    FedAdam(server_lr=0.1),
    FedYogi(server_lr=0.1),
    FedProx(mu=0.1),
    Scaffold(num_clients=4),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_strategy_reduces_the_global_loss(strategy: Any) -> None:
    clients = make_clients(7, n=4, steps=5)
    w_star, loss = optimum_and_loss(clients)
    state = strategy.init(vec(0, 0, 0))
    gaps = [loss(state.params.flat) - loss(w_star)]
    states: list[tuple[QuadraticTrainer, ClientState]] = [(t, {}) for t in clients]
    for _ in range(40):
        state = run_round(strategy, state, states, lr=0.05)
        gaps.append(loss(state.params.flat) - loss(w_star))
    assert gaps[-1] < 0.1 * gaps[0], gaps[::10]
    assert state.round == 40


def test_scaffold_removes_client_drift_that_fedavg_suffers() -> None:
    clients = make_clients(3, n=4, steps=50)
    w_star, _ = optimum_and_loss(clients)
    results = {}
    for strategy in (FedAvg(), Scaffold(num_clients=4)):
        state = strategy.init(vec(0, 0, 0))
        states: list[tuple[QuadraticTrainer, ClientState]] = [(t, {}) for t in clients]
        for _ in range(100):
            state = run_round(strategy, state, states, lr=0.1)
        results[type(strategy).__name__] = float(np.linalg.norm(state.params.flat - w_star))
    assert results["FedAvg"] > 0.1, results  # drift is real on this problem ...
    assert results["Scaffold"] < 1e-3, results  # ... and SCAFFOLD corrects it
