import os

import numpy as np
from toy import Toy, federation_of, initial

from fedloom.algorithms import FedAvg, Scaffold
from fedloom.core.params import Params
from fedloom.core.types import FitConfig, Update
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.processes import ProcessTransport, pack, unpack
from fedloom.runtime.transport import InProcessTransport, Transport


def run(transport: Transport, trainers, strategy, settings):  # type: ignore[no-untyped-def]
    try:
        return Federation(strategy, transport, list(trainers), settings).run(initial())
    finally:
        transport.close()


def test_pack_round_trip() -> None:
    head, blobs = unpack(pack({"a": 1}, [b"xy", b"", b"z"]))
    assert head == {"a": 1} and [bytes(b) for b in blobs] == [b"xy", b"", b"z"]


def test_worker_processes_give_bit_identical_results() -> None:
    settings = Settings(rounds=4, fraction_fit=0.5, fraction_evaluate=0.3, learning_rate=0.05)
    for strategy in (FedAvg(), Scaffold(num_clients=12)):
        a = run(
            InProcessTransport(ClientPool(federation_of(12))), federation_of(12), strategy, settings
        )
        b = run(
            ProcessTransport(ClientPool(federation_of(12)), workers=2),
            federation_of(12),
            strategy,
            settings,
        )
        assert a.state.params.flat.tobytes() == b.state.params.flat.tobytes()
        assert [r.metrics for r in a.history] == [r.metrics for r in b.history]
        for name, slot in a.state.slots.items():
            assert slot.flat.tobytes() == b.state.slots[name].flat.tobytes()


class Crasher(Toy):
    def fit(self, params: Params, config: FitConfig) -> Update:
        os._exit(9)


def test_a_worker_that_dies_is_a_failure_not_a_crash() -> None:
    trainers = federation_of(6)
    trainers["c00"] = Crasher(np.zeros(4), 10)
    transport = ProcessTransport(ClientPool(trainers), workers=2)
    result = run(
        transport, trainers, FedAvg(), Settings(rounds=2, fraction_fit=1.0, min_fit_clients=2)
    )
    reasons = [r.reason for rec in result.history for r in rec.rejections]
    assert any("worker process died" in r for r in reasons)
    assert all(rec.num_accepted >= 2 for rec in result.history)
