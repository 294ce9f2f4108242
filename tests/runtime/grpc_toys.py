"""Trainers that `fedloom client --trainer grpc_toys:NAME` builds in client processes (tests)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from toy import Toy, federation_of

from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

#: Parameters of `Wide`: 1.5 M float32 values, a 6 MB payload (over gRPC's 4 MiB default).
WIDE = 1_500_000


def toy(client_id: str) -> Toy:
    """The client of `federation_of(3)` with this id (c00, c01, c02)."""
    return federation_of(3)[client_id]


class Wide:
    """Returns delta = -params / 2 (exactly representable), so a round trip is checkable."""

    def initial_params(self) -> Params:
        return Params.from_arrays({"w": np.arange(WIDE, dtype=np.float32)})

    def fit(self, params: Params, config: FitConfig) -> Update:
        return Update(params * -0.5, 7, 1, {"loss": 1.0})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return Evaluation(1, {"loss": 0.0})


def wide(client_id: str) -> Wide:
    return Wide()


class Stuck(Toy):
    """Announces its fit (touches $FEDLOOM_TEST_MARKER) and then never finishes it."""

    def fit(self, params: Params, config: FitConfig) -> Update:
        Path(os.environ["FEDLOOM_TEST_MARKER"]).touch()
        time.sleep(600)
        raise AssertionError("unreachable")


def stuck(client_id: str) -> Stuck:
    return Stuck(np.zeros(4), 10)
