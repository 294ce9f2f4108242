"""Server optimizers that treat the round's mean delta as a pseudo-gradient.

FedAvgM is Hsu et al. 2019; FedAdagrad, FedAdam and FedYogi are Algorithm 2 of Reddi et al.
2021, "Adaptive Federated Optimization". Sign convention: the aggregate delta is
`mean(local - global)`, i.e. a *descent* direction, so every step here ADDS it (the paper writes
the same thing with Delta_t = mean(x_i - x_t) and x_{t+1} = x_t + eta * ...).

All optimizer state lives in `ServerState.slots` (same layout as the params):
`"momentum"` (first moment) for every optimizer here, plus `"second_moment"` for the adaptive
ones, so a checkpoint of the state is a checkpoint of the optimizer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.algorithms.base import Aggregate, LocalAlgorithm, PlainLocal, ServerState
from fedloom.core.params import FloatArray, Params


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FedAvgM:
    """FedAvg with server momentum (Hsu et al. 2019).

    Per round, with Delta the aggregate delta: `m <- momentum * m + Delta`, then
    `w <- w + server_lr * m` (heavy-ball form, no dampening: with `momentum=0` and
    `server_lr=1` this is exactly FedAvg). Slot `"momentum"` starts at zero.

    Raises `ValueError` if `server_lr` is not > 0 or `momentum` is not in [0, 1).
    """

    server_lr: float = 1.0
    momentum: float = 0.9
    local: LocalAlgorithm = field(default_factory=PlainLocal)

    def __post_init__(self) -> None:
        _check_positive("server_lr", self.server_lr)
        _check_unit_interval("momentum", self.momentum)

    def init(self, params: Params) -> ServerState:
        """State around a private copy of `params`, with a zero momentum slot."""
        return ServerState(params=params.copy(), slots={"momentum": Params.zeros(params.layout)})

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """Server momentum is server-only: nothing is sent beyond the model."""
        return {}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """A new state with updated momentum and params; `state` is not modified."""
        m = state.slots["momentum"] * self.momentum + aggregate.delta
        params = state.params + m * self.server_lr
        slots = {**state.slots, "momentum": m}
        return replace(state, params=params, round=state.round + 1, slots=slots)


@dataclass(frozen=True, kw_only=True)
class _AdaptiveServerOpt(ABC):
    """Reddi et al. 2021, Algorithm 2, shared by FedAdagrad, FedAdam and FedYogi.

    Per round, with Delta the aggregate delta (element-wise operations):
        m <- beta1 * m + (1 - beta1) * Delta
        v <- second_moment_rule(v, Delta^2)          (the only difference between the three)
        w <- w + server_lr * m / (sqrt(v) + tau)
    Slots: `"momentum"` (m, starts at 0) and `"second_moment"` (v, starts at tau^2, the
    paper's v_{-1} >= tau^2; Flower starts v at 0 instead). No bias correction, as in the paper.

    Defaults follow the paper's recommendations (Section 5 / Appendix): beta1 = 0.9,
    tau = 1e-3, server_lr = 1e-2; tune server_lr per task, as the paper does.
    """

    server_lr: float = 1e-2
    beta1: float = 0.9
    tau: float = 1e-3
    local: LocalAlgorithm = field(default_factory=PlainLocal)

    def __post_init__(self) -> None:
        _check_positive("server_lr", self.server_lr)
        _check_unit_interval("beta1", self.beta1)
        _check_positive("tau", self.tau)

    @abstractmethod
    def _second_moment(self, v: FloatArray, delta_sq: FloatArray) -> FloatArray:
        """The new second moment from the old one and the squared delta (new array)."""

    def init(self, params: Params) -> ServerState:
        """State around a private copy of `params`; momentum 0, second moment tau^2."""
        layout = params.layout
        v0 = Params(layout, np.full(layout.size, self.tau**2, dtype=layout.dtype))
        return ServerState(
            params=params.copy(), slots={"momentum": Params.zeros(layout), "second_moment": v0}
        )

    def broadcast(self, state: ServerState) -> dict[str, Params]:
        """Server optimizers are server-only: nothing is sent beyond the model."""
        return {}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """A new state after one optimizer step; `state` is not modified."""
        delta = aggregate.delta
        m = state.slots["momentum"] * self.beta1 + delta * (1.0 - self.beta1)
        v_old = state.slots["second_moment"]
        v = v_old.with_flat(self._second_moment(v_old.flat, delta.flat * delta.flat))
        step = m.flat / (np.sqrt(v.flat) + self.tau)
        params = state.params + state.params.with_flat(step) * self.server_lr
        slots = {**state.slots, "momentum": m, "second_moment": v}
        return replace(state, params=params, round=state.round + 1, slots=slots)


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(_AdaptiveServerOpt):
    """FedAdagrad (Reddi et al. 2021): second moment `v <- v + Delta^2`.

    Update rule, slots and defaults as described for the adaptive optimizers in this module
    (`server_lr=1e-2, beta1=0.9, tau=1e-3`; Flower's FedAdagrad fixes beta1 = 0 instead).
    Raises `ValueError` if `server_lr` or `tau` is not > 0 or `beta1` is not in [0, 1).
    """

    def _second_moment(self, v: FloatArray, delta_sq: FloatArray) -> FloatArray:
        return v + delta_sq


@dataclass(frozen=True, kw_only=True)
class _TwoBetaServerOpt(_AdaptiveServerOpt):
    """An adaptive server optimizer whose second moment decays with `beta2` in [0, 1)."""

    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval("beta2", self.beta2)


@dataclass(frozen=True, kw_only=True)
class FedAdam(_TwoBetaServerOpt):
    """FedAdam (Reddi et al. 2021): `v <- beta2 * v + (1 - beta2) * Delta^2`.

    Defaults `server_lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3`. Raises `ValueError` if
    `server_lr` or `tau` is not > 0 or `beta1` / `beta2` is not in [0, 1).
    """

    def _second_moment(self, v: FloatArray, delta_sq: FloatArray) -> FloatArray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


@dataclass(frozen=True, kw_only=True)
class FedYogi(_TwoBetaServerOpt):
    """FedYogi (Reddi et al. 2021): `v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)`.

    Unlike Adam, v moves towards Delta^2 by an additive step, so it grows quickly and shrinks
    slowly. Defaults `server_lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3`. Raises `ValueError` if
    `server_lr` or `tau` is not > 0 or `beta1` / `beta2` is not in [0, 1).
    """

    def _second_moment(self, v: FloatArray, delta_sq: FloatArray) -> FloatArray:
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)
