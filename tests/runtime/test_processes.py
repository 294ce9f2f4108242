import os

import numpy as np
from toy import Toy, federation_of

from fedloom.algorithms import FedAvg, Scaffold
from fedloom.core.params import Params
from fedloom.core.types import FitConfig, Update
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.messages import pack, unpack
from fedloom.runtime.processes import ProcessTransport
from fedloom.runtime.transport import InProcessTransport, Transport


def run(transport: Transport, trainers, strategy, settings):  # type: ignore[no-untyped-def]
    try:
        first = next(iter(trainers.values()))
        return Federation(strategy, transport, list(trainers), settings).run(first.initial_params())
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


class Wide:
    """A 200,000-parameter client: every payload is far larger than a pipe's buffer."""

    num_train_examples = 10

    def __init__(self, target: float) -> None:
        self.target = np.float32(target)

    def initial_params(self) -> Params:
        return Params.from_arrays({"w": np.zeros(200_000, np.float32)})

    def fit(self, params: Params, config: FitConfig) -> Update:
        w = params.flat.copy()
        for _ in range(3):
            grad = w - self.target
            if config.gradient_correction is not None:
                grad = grad + config.gradient_correction.flat
            w -= config.learning_rate * grad
        return Update(params.with_flat(w - params.flat), 10, 3)

    def evaluate(self, params: Params, config: object) -> None:
        raise NotImplementedError


def test_large_client_states_do_not_deadlock_the_pipes() -> None:
    """SCAFFOLD sends a model-sized state and broadcast with every task; with two tasks in
    flight per worker, large inline messages once deadlocked parent and worker."""
    import faulthandler

    trainers = {f"c{i}": Wide(i / 10) for i in range(8)}
    settings = Settings(rounds=3, fraction_fit=1.0, learning_rate=0.1)
    faulthandler.dump_traceback_later(60, exit=True)  # a deadlock fails loudly, never hangs CI
    try:
        a = run(
            ProcessTransport(ClientPool(trainers), workers=2),
            trainers,
            Scaffold(num_clients=8),
            settings,
        )
    finally:
        faulthandler.cancel_dump_traceback_later()
    b = run(InProcessTransport(ClientPool(trainers)), trainers, Scaffold(num_clients=8), settings)
    assert a.state.params.flat.tobytes() == b.state.params.flat.tobytes()


def test_an_interrupt_between_receiving_and_booking_a_reply_does_not_hang(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """Ctrl-C can land after a reply left its pipe and before the dispatch booked it; the
    dispatch must then raise at once, not wait for a reply that will never come."""
    import threading

    import fedloom.runtime.processes as processes
    from fedloom.core.types import Task, TaskKind

    real_parse = processes.parse_reply
    calls = []

    def interrupted(data: bytes):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_parse(data)

    monkeypatch.setattr(processes, "parse_reply", interrupted)
    trainers = federation_of(6)
    transport = ProcessTransport(ClientPool(trainers), workers=2)
    params = next(iter(trainers.values())).initial_params()
    tasks = [
        Task(cid, TaskKind.FIT, params, fit=FitConfig(round=1, batch_size=5)) for cid in trainers
    ]
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            list(transport.dispatch(tasks, FedAvg().local))
            outcome.append(None)
        except BaseException as exc:  # the interrupt is what this test waits for
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=30)
    try:
        assert not thread.is_alive(), "dispatch hung after an interrupt"
        assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
        monkeypatch.setattr(processes, "parse_reply", real_parse)
        replies = list(transport.dispatch(tasks, FedAvg().local))  # fresh workers, all served
        assert len(replies) == len(tasks) and all(r.failure is None for r in replies)
    finally:
        transport.close()
