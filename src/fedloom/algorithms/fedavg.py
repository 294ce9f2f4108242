"""FedAvg (McMahan et al. 2017): the new global model is the example-weighted mean of the
clients' local models, i.e. `w + server_lr * mean(delta)` with `server_lr = 1`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fedloom.algorithms.base import Aggregate, LocalAlgorithm, PlainLocal, ServerState
from fedloom.core.params import Params


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging with an optional server learning rate.

    Raises `ValueError` if `server_lr` is not a finite number > 0."""

    server_lr: float = 1.0
    local: LocalAlgorithm = field(default_factory=PlainLocal)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr!r}")

    def init(self, params: Params) -> ServerState:
        """State around a private copy of `params`."""
        return ServerState(params=params.copy())

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """FedAvg sends nothing beyond the model."""
        return {}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """`w <- w + server_lr * delta`."""
        new = state.params.copy().add_scaled_(aggregate.delta, self.server_lr)
        return replace(state, params=new, round=state.round + 1)
