"""Server algorithms (strategies) and their client halves."""

from fedloom.algorithms.base import (
    Aggregate,
    ClientState,
    LocalAlgorithm,
    PlainLocal,
    ProximalLocal,
    ServerState,
    Strategy,
)
from fedloom.algorithms.fedavg import FedAvg
from fedloom.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedloom.algorithms.fedprox import FedProx
from fedloom.algorithms.scaffold import Scaffold, ScaffoldLocal

__all__ = [
    "Aggregate",
    "ClientState",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "LocalAlgorithm",
    "PlainLocal",
    "ProximalLocal",
    "Scaffold",
    "ScaffoldLocal",
    "ServerState",
    "Strategy",
]
