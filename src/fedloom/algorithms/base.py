"""The `Strategy` seam: a pure server algorithm, and the client half some algorithms need.

A round, seen by a strategy:

    state = strategy.init(initial_params)
    broadcast = strategy.broadcast(state)          # extra vectors sent with every fit task
    ... clients run strategy.local (their half) and return updates ...
    state = strategy.update(state, aggregate)      # new global params and optimizer slots

Strategies hold hyperparameters only; everything that changes between rounds lives in the
`ServerState` they return, so a checkpoint of the state is a checkpoint of the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import FitConfig, Metrics, Update

#: Per-client persistent state of a client half (for example SCAFFOLD's c_i), by name.
ClientState = dict[str, Params]


@dataclass(frozen=True, slots=True)
class ServerState:
    """Everything a strategy needs between rounds.

    `params` is the global model; `slots` are named optimizer buffers (momentum, second
    moments, control variates) in the same layout as `params`; `round` counts completed
    rounds.
    """

    params: Params
    round: int = 0
    slots: dict[str, Params] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The combined result of one round's accepted updates.

    `delta` is the example-weighted mean of the clients' deltas; `extras` holds the unweighted
    mean of each named extra; `num_clients` and `num_examples` count what went in.
    """

    delta: Params
    num_clients: int
    num_examples: int
    extras: dict[str, Params] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)


class LocalAlgorithm(Protocol):
    """The client half of a strategy: how one client turns a task into an update.

    `extra_names` lists the extras every update it returns carries (each in the model's
    layout); the server rejects updates that lack one or carry others.
    """

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Names of the extras in every returned update."""
        ...

    def run(
        self,
        trainer: Trainer,
        params: Params,
        config: FitConfig,
        broadcast: dict[str, Params],
        state: ClientState,
    ) -> Update:
        """Train from `params`; may read `state` and replace its entries (assign new values,
        never modify a stored value in place: a discarded attempt restores the old entries)."""
        ...


@dataclass(frozen=True, slots=True)
class PlainLocal:
    """Local training exactly as the trainer does it (FedAvg and the server optimizers)."""

    extra_names: tuple[str, ...] = ()

    def run(
        self,
        trainer: Trainer,
        params: Params,
        config: FitConfig,
        broadcast: dict[str, Params],
        state: ClientState,
    ) -> Update:
        """Call `trainer.fit` unchanged."""
        return trainer.fit(params, config)


@dataclass(frozen=True, slots=True)
class ProximalLocal:
    """FedProx's client half: local objective plus mu/2 * ||w - w_global||^2."""

    mu: float
    extra_names: tuple[str, ...] = ()

    def run(
        self,
        trainer: Trainer,
        params: Params,
        config: FitConfig,
        broadcast: dict[str, Params],
        state: ClientState,
    ) -> Update:
        """Call `trainer.fit` with `proximal_mu` set."""
        return trainer.fit(params, replace(config, proximal_mu=self.mu))


class Strategy(Protocol):
    """A server algorithm. Implementations are pure: same inputs, same outputs.

    `local` is the client half every selected client runs; `broadcast(state)` names the extra
    vectors it needs from the server; `update` folds one round's aggregate into the state and
    increments `round`.
    """

    @property
    def local(self) -> LocalAlgorithm:
        """The client half."""
        ...

    def init(self, params: Params) -> ServerState:
        """Initial state around the starting model."""
        ...

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """Extra vectors sent with every fit task this round."""
        ...

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """The state after one round."""
        ...
