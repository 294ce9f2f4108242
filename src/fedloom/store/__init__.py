"""Persistence: the SQLite run store, and checkpoints and models as safetensors files."""

from fedloom.store.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune,
    read_metadata,
    save_checkpoint,
    save_model,
)
from fedloom.store.runstore import (
    AmbiguousRunError,
    ClientRecord,
    Rejection,
    RoundRecord,
    RunInfo,
    RunStatus,
    RunStore,
    RunStoreError,
    RunSummary,
    UnknownRunError,
)

__all__ = [
    "AmbiguousRunError",
    "CheckpointError",
    "ClientRecord",
    "Rejection",
    "RoundRecord",
    "RunInfo",
    "RunStatus",
    "RunStore",
    "RunStoreError",
    "RunSummary",
    "UnknownRunError",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "prune",
    "read_metadata",
    "save_checkpoint",
    "save_model",
]
