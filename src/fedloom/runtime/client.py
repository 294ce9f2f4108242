"""Running one task on one client: the code every runtime shares on the client side."""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import Failure, Reply, Task, TaskKind
from fedloom.core.wire import encoded_size


def describe_exception(exc: BaseException) -> str:
    """One line naming the exception type, message and the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"raised {type(exc).__name__}: {exc}{where}"


def run_task(trainer: Trainer, task: Task, local: LocalAlgorithm, state: ClientState) -> Reply:
    """Execute `task` with `trainer`; every exception becomes a `Failure` in the reply.

    Fit tasks go through the strategy's client half `local`, which may update `state` in place.
    Byte counts are the sizes the payloads have in the wire format.
    """
    start = time.perf_counter()
    down = encoded_size(task.params.layout) + sum(
        encoded_size(p.layout) for p in task.broadcast.values()
    )
    try:
        if task.kind is TaskKind.FIT:
            if task.fit is None:
                raise ValueError("fit task without a FitConfig")
            update = local.run(trainer, task.params, task.fit, task.broadcast, state)
            up = _payload_size(getattr(update, "delta", None)) + sum(
                _payload_size(p) for p in getattr(update, "extras", {}).values()
            )
            return Reply(
                task.client_id,
                update=update,
                bytes_down=down,
                bytes_up=up,
                seconds=time.perf_counter() - start,
            )
        if task.evaluate is None:
            raise ValueError("evaluate task without an EvalConfig")
        evaluation = trainer.evaluate(task.params, task.evaluate)
        return Reply(
            task.client_id,
            evaluation=evaluation,
            bytes_down=down,
            bytes_up=64,
            seconds=time.perf_counter() - start,
        )
    except Exception as exc:  # a client's failure is a value, never a server crash
        return Reply(
            task.client_id,
            failure=Failure(task.client_id, describe_exception(exc)),
            bytes_down=down,
            seconds=time.perf_counter() - start,
        )


def _payload_size(value: object) -> int:
    return encoded_size(value.layout) if isinstance(value, Params) else 0


class ClientPool:
    """The simulated clients of one process: trainers by id, and each client's own state.

    `states[client_id]` is the persistent state of the strategy's client half for that client
    (for example SCAFFOLD's control variate); it is created empty on first use.
    """

    def __init__(self, trainers: Mapping[str, Trainer]) -> None:
        if not trainers:
            raise ValueError("a federation needs at least one client")
        self.trainers = trainers
        self.states: dict[str, ClientState] = {}

    def run(self, task: Task, local: LocalAlgorithm) -> Reply:
        """Run `task` on its client; an unknown client id is a `Failure`, not an exception."""
        trainer = self.trainers.get(task.client_id)
        if trainer is None:
            return Reply(task.client_id, failure=Failure(task.client_id, "unknown client id"))
        state = self.states.setdefault(task.client_id, {})
        return run_task(trainer, task, local, state)
