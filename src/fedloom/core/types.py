"""Typed messages of one round: what the server sends (`Task`) and what comes back (`Reply`).

No magic strings travel between components: local-training hyperparameters are a `FitConfig`,
evaluation a `EvalConfig`, results an `Update`, an `Evaluation` or a `Failure` value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fedloom.core.params import Params

#: Scalar metrics reported by a client or computed by the server.
Metrics = dict[str, float]


@dataclass(frozen=True, slots=True)
class FitConfig:
    """Hyperparameters of one client's local training in one round.

    `proximal_mu` > 0 adds FedProx's term mu/2 * ||w - w_global||^2 to the local objective.
    `gradient_correction`, when set, is added to every local gradient (SCAFFOLD's c - c_i).
    `seed` fixes the client's local shuffling and any other local randomness.
    """

    round: int
    epochs: int = 1
    batch_size: int = 10
    learning_rate: float = 0.01
    seed: int = 0
    proximal_mu: float = 0.0
    gradient_correction: Params | None = None


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """What an evaluation on a client's held-out data needs."""

    round: int
    batch_size: int = 1024


@dataclass(frozen=True, slots=True)
class Update:
    """A client's result of local training.

    `delta` is local model minus the global model the client received. `num_examples` weights
    it in aggregation. `num_steps` is the number of local optimizer steps (SCAFFOLD needs it).
    `extras` carries algorithm-specific named vectors (for example SCAFFOLD's control delta);
    the aggregator averages each extra with equal weight per client.
    """

    delta: Params
    num_examples: int
    num_steps: int = 0
    metrics: Metrics = field(default_factory=dict)
    extras: dict[str, Params] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A client's evaluation of the global model on its held-out data."""

    num_examples: int
    metrics: Metrics


class TaskKind(Enum):
    """What a task asks a client to do."""

    FIT = "fit"
    EVALUATE = "evaluate"


@dataclass(frozen=True, slots=True)
class Task:
    """One instruction to one client: train on or evaluate `params` with `config`.

    `broadcast` carries the strategy's extra server vectors for the client half of the
    algorithm (for example SCAFFOLD's server control variate); empty for most strategies.
    """

    client_id: str
    kind: TaskKind
    params: Params
    fit: FitConfig | None = None
    evaluate: EvalConfig | None = None
    broadcast: dict[str, Params] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failure:
    """A client that did not produce a usable result, and why (a value, never raised)."""

    client_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back for one task: exactly one of `update`, `evaluation` or `failure`."""

    client_id: str
    update: Update | None = None
    evaluation: Evaluation | None = None
    failure: Failure | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
