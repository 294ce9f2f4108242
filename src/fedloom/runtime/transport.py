"""The `Transport` seam: how tasks reach clients and replies come back.

Simulation, worker processes and the network all sit behind the same few methods. Failures and
timeouts are `Reply.failure` values, never exceptions out of `dispatch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.types import Reply, Task
from fedloom.runtime.client import ClientPool


class Transport(Protocol):
    """Delivers tasks and yields one `Reply` per task, in an order the transport documents."""

    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Run `tasks`, each fit task through the client half `local`; yield every reply."""
        ...

    def late_replies(self) -> list[Reply]:
        """Replies that arrived after their dispatch stopped waiting for them (a deadline, a
        closed round), since the last call. They were never aggregated; the federation records
        each as a rejection of the current round."""
        ...

    def client_states(self) -> dict[str, ClientState]:
        """The persistent client-half states of simulated clients (empty for real clients)."""
        ...

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Replace the simulated clients' states (used when a run resumes)."""
        ...

    def close(self) -> None:
        """Release workers and connections. Idempotent."""
        ...


class InProcessTransport:
    """Runs every task in the calling thread, in task order. The simplest, fully deterministic
    runtime, and the reference the others are checked against."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool

    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Yield replies in task order as each finishes."""
        for task in tasks:
            yield self.pool.run(task, local)

    def late_replies(self) -> list[Reply]:
        """None: a task that is not waited for is never run."""
        return []

    def client_states(self) -> dict[str, ClientState]:
        """The pool's states (live, not a copy)."""
        return self.pool.states

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Replace the pool's states."""
        self.pool.states = dict(states)

    def close(self) -> None:
        """Nothing to release."""
