"""FedProx (Li et al. 2020): FedAvg's server step, with a proximal term on every client.

Clients minimise `f_i(w) + mu/2 * ||w - w_global||^2` (the `ProximalLocal` client half sets
`FitConfig.proximal_mu`; the trainer applies it). The server step is FedAvg's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedloom.algorithms.base import Aggregate, LocalAlgorithm, ProximalLocal, ServerState
from fedloom.algorithms.fedavg import FedAvg
from fedloom.core.params import Params


@dataclass(frozen=True)
class FedProx:
    """FedProx with proximal weight `mu` (>= 0; 0 is FedAvg) and a server learning rate.

    `local` is `ProximalLocal(mu)`; `init`, `broadcast` and `update` are FedAvg's with the same
    `server_lr`. Raises `ValueError` if `mu` is negative or `server_lr` is not > 0.
    """

    mu: float
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {self.mu!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr!r}")

    @property
    def local(self) -> LocalAlgorithm:
        """The client half: local training with `proximal_mu = mu`."""
        return ProximalLocal(self.mu)

    @property
    def _server(self) -> FedAvg:
        return FedAvg(server_lr=self.server_lr)

    def init(self, params: Params) -> ServerState:
        """State around a private copy of `params` (as FedAvg)."""
        return self._server.init(params)

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """Nothing beyond the model (as FedAvg): `mu` travels in the fit config."""
        return self._server.broadcast(state)

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """`w <- w + server_lr * delta` (as FedAvg); `state` is not modified."""
        return self._server.update(state, aggregate)
