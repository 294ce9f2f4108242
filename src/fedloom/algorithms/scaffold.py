"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Server keeps a control variate c (slot `"control"`), each client its own c_i (client state
`"control"`). Clients take local steps on `grad f_i(y) + (c - c_i)` and then refresh c_i with
Option II of the paper: `c_i+ = c_i - c + (x - y_i) / (K * lr)`, the mean gradient along the
local trajectory. Server step: `x <- x + server_lr * Delta_x`, `c <- c + |S|/N * mean(Delta_c)`.

Weighting: the paper averages Delta_x with equal weight per client; fedloom's aggregate delta
is example-weighted (equal to the paper when clients hold equally many examples). Delta_c is
the unweighted mean (`Aggregate.extras["control_delta"]`), as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedloom.algorithms.base import Aggregate, ClientState, LocalAlgorithm, ServerState
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import FitConfig, Update

#: Name of the control variate: server slot, broadcast entry and client-state entry.
CONTROL = "control"
#: Name of the update extra carrying `c_i+ - c_i`.
CONTROL_DELTA = "control_delta"


@dataclass(frozen=True, slots=True)
class ScaffoldLocal:
    """SCAFFOLD's client half (Option II control-variate update)."""

    @property
    def extra_names(self) -> tuple[str, ...]:
        """`("control_delta",)`: every update carries `c_i+ - c_i`."""
        return (CONTROL_DELTA,)

    def run(
        self,
        trainer: Trainer,
        params: Params,
        config: FitConfig,
        broadcast: dict[str, Params],
        state: ClientState,
    ) -> Update:
        """Train with gradient correction `c - c_i`, then refresh c_i.

        Reads c from `broadcast["control"]` and c_i from `state["control"]` (zeros when
        absent). With K = `update.num_steps` and lr = `config.learning_rate`, stores
        `state["control"] = c_i - c - delta / (K * lr)` (a new `Params`; the old one is not
        modified) and returns the trainer's update with `extras["control_delta"] = c_i+ - c_i`.
        Raises `ValueError` if the broadcast lacks the control variate, or if K or lr is not
        > 0.
        """
        if CONTROL not in broadcast:
            raise ValueError(f"SCAFFOLD needs broadcast[{CONTROL!r}] (the server control variate)")
        if not config.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 for SCAFFOLD, got {config.learning_rate}")
        c = broadcast[CONTROL]
        c_i = state.get(CONTROL)
        if c_i is None:
            c_i = Params.zeros(params.layout)
        update = trainer.fit(params, replace(config, gradient_correction=c - c_i))
        k = update.num_steps
        if k <= 0:
            raise ValueError(f"SCAFFOLD needs update.num_steps > 0 from the trainer, got {k}")
        c_i_new = c_i - c + update.delta * (-1.0 / (k * config.learning_rate))
        state[CONTROL] = c_i_new
        return replace(update, extras={**update.extras, CONTROL_DELTA: c_i_new - c_i})


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD's server half, for a federation of `num_clients` clients in total (N).

    `local` is `ScaffoldLocal()`. Raises `ValueError` if `num_clients` < 1 or `server_lr`
    is not > 0.
    """

    num_clients: int
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr!r}")

    @property
    def local(self) -> LocalAlgorithm:
        """The client half, `ScaffoldLocal()`."""
        return ScaffoldLocal()

    def init(self, params: Params) -> ServerState:
        """State around a private copy of `params`, with a zero control variate."""
        return ServerState(params=params.copy(), slots={CONTROL: Params.zeros(params.layout)})

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """`{"control": c}`, a copy of the server control variate."""
        return {CONTROL: state.slots[CONTROL].copy()}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """`x <- x + server_lr * delta`, `c <- c + |S|/N * mean(control_delta)`.

        `state` is not modified. Raises `ValueError` if the aggregate lacks
        `extras["control_delta"]` or counts more clients than `num_clients`.
        """
        if CONTROL_DELTA not in aggregate.extras:
            raise ValueError(f"SCAFFOLD needs aggregate.extras[{CONTROL_DELTA!r}]")
        if aggregate.num_clients > self.num_clients:
            raise ValueError(
                f"aggregate has {aggregate.num_clients} clients but num_clients (N) is "
                f"{self.num_clients}"
            )
        params = state.params + aggregate.delta * self.server_lr
        fraction = aggregate.num_clients / self.num_clients
        control = state.slots[CONTROL] + aggregate.extras[CONTROL_DELTA] * fraction
        slots = {**state.slots, CONTROL: control}
        return replace(state, params=params, round=state.round + 1, slots=slots)
