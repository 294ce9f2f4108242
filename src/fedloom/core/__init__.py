"""Core value types: `Params`, the wire format, round messages and the `Trainer` seam."""

from fedloom.core.params import Layout, Params, ParamsError, TensorSpec
from fedloom.core.trainer import Trainer
from fedloom.core.types import (
    EvalConfig,
    Evaluation,
    Failure,
    FitConfig,
    Metrics,
    Reply,
    Task,
    TaskKind,
    Update,
)
from fedloom.core.wire import WireError, decode, encode, encoded_size

__all__ = [
    "EvalConfig",
    "Evaluation",
    "Failure",
    "FitConfig",
    "Layout",
    "Metrics",
    "Params",
    "ParamsError",
    "Reply",
    "Task",
    "TaskKind",
    "TensorSpec",
    "Trainer",
    "Update",
    "WireError",
    "decode",
    "encode",
    "encoded_size",
]
