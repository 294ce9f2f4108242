"""fedloom: federated learning that is fast in simulation and the same code in deployment.

The public API in one import::

    from fedloom import Params, Update, FedAvg, Federation, Settings, ClientPool

Torch-based pieces live in `fedloom.adapters` and `fedloom.models` and import torch lazily.
"""

from fedloom.algorithms import (
    Aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    ServerState,
    Strategy,
)
from fedloom.core import EvalConfig, Evaluation, FitConfig, Params, Trainer, Update
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, RoundFailed, RoundResult, RunResult
from fedloom.runtime.processes import ProcessTransport
from fedloom.runtime.settings import Settings
from fedloom.runtime.transport import InProcessTransport, Transport

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "ClientPool",
    "EvalConfig",
    "Evaluation",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Federation",
    "FitConfig",
    "InProcessTransport",
    "Params",
    "ProcessTransport",
    "RoundFailed",
    "RoundResult",
    "RunResult",
    "Scaffold",
    "ServerState",
    "Settings",
    "Strategy",
    "Trainer",
    "Transport",
    "Update",
]
