"""The `Trainer` seam: user code that trains and evaluates a model on one client's data."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update


@runtime_checkable
class Trainer(Protocol):
    """Local training and evaluation on data that never leaves the client.

    Contract:
    - `initial_params()` returns the model's parameters in the layout every client shares;
    - `fit(params, config)` starts from `params`, trains locally as `config` says, and returns
      an `Update` whose `delta` is (local result - params) in the same layout. It must honour
      `config.proximal_mu` and `config.gradient_correction` or raise `NotImplementedError`;
    - `evaluate(params, config)` scores `params` on the client's held-out data.
    A trainer may raise; the runtime turns the exception into a recorded `Failure`.
    """

    def initial_params(self) -> Params:
        """The model's starting parameters."""
        ...

    def fit(self, params: Params, config: FitConfig) -> Update:
        """Train locally from `params`; return the delta."""
        ...

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Score `params` on held-out data."""
        ...
