"""Simulation on every core: forked worker processes fed through shared memory.

Workers are forked from the process that holds the `ClientPool`, so they inherit every client's
data and model without any serialization. Per round, the global model (and any broadcast
vectors) is written once into a shared-memory segment; a task message is a few hundred bytes
(client id and config). Replies come back in fedloom's wire format, never pickle.

Replies are yielded in task order (a small reorder buffer), so results are bit-identical to
`InProcessTransport` for the same seed. Tasks are handed out largest client first, each worker
holding at most two, which balances the round's clients across workers by data size.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import typing
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.params import Params
from fedloom.core.types import (
    EvalConfig,
    FitConfig,
    Reply,
    Task,
    TaskKind,
)
from fedloom.core.wire import decode, encode
from fedloom.runtime.client import ClientPool
from fedloom.runtime.messages import lost, pack, parse_reply, reply_message, unpack

#: Where a payload lies in shared memory: segment name, offset, size, round generation.
Location = tuple[str, int, int, int]


class _Payloads:
    """Round payloads (params + broadcast) in one growing shared-memory segment."""

    def __init__(self) -> None:
        self.shm: SharedMemory | None = None
        self.used = 0
        self.generation = 0

    def reset(self) -> None:
        self.used = 0
        self.generation += 1

    def put(self, blob: bytes) -> Location:
        end = self.used + len(blob)
        if self.shm is None or end > self.shm.size:
            raise _Grow(max(end, 2 * (self.shm.size if self.shm else 0), 1 << 20))
        buf = self.shm.buf
        assert buf is not None
        buf[self.used : end] = blob
        start, self.used = self.used, end
        return self.shm.name, start, len(blob), self.generation

    def grow(self, size: int) -> None:
        self.close()
        self.shm = SharedMemory(create=True, size=size)
        self.used = 0

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class _Grow(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _attach(name: str) -> SharedMemory:
    """Attach to the parent's segment. Forked workers share the parent's resource tracker, so
    the segment stays registered once and is unlinked by the parent alone."""
    return SharedMemory(name=name)


def _worker(conn: Connection, pool: ClientPool, local: LocalAlgorithm) -> None:
    """Worker loop: one task message in, one reply message out, until told to stop.

    Ctrl-C is the parent's to handle (it records the run as interrupted and stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    attached: dict[str, SharedMemory] = {}
    cache: dict[tuple[str, int, int, int], Params] = {}

    def read(where: list[Any], shared: bool) -> Params:
        """Decode a payload the parent placed in shared memory (`shared`: reuse per round)."""
        name, start, size, generation = where
        key = (name, start, size, generation)
        if name not in attached:
            for old in attached.values():
                old.close()
            attached.clear()
            attached[name] = _attach(name)
        if any(k[3] != generation or k[0] != name for k in cache):
            cache.clear()  # a new round: last round's payloads are gone
        if shared and key in cache:
            return cache[key]
        buf = attached[name].buf
        assert buf is not None
        value = decode(buf[start : start + size])[0]
        if shared:
            cache[key] = value
        return value

    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        if not message:
            return
        head, _ = unpack(message)
        params = read(head["params"], shared=True)
        broadcast = {n: read(w, shared=True) for n, w in head["broadcast"]}
        state = {n: read(w, shared=False) for n, w in head["state"]}
        kind = TaskKind(head["kind"])
        task = Task(
            head["client"],
            kind,
            params,
            fit=FitConfig(**head["fit"]) if kind is TaskKind.FIT else None,
            evaluate=EvalConfig(**head["eval"]) if kind is TaskKind.EVALUATE else None,
            broadcast=broadcast,
        )
        pool.states[task.client_id] = state
        reply = pool.run(task, local)
        conn.send_bytes(reply_message(head["i"], reply, pool.states.pop(task.client_id, {})))


class ProcessTransport:
    """Runs tasks in `workers` forked processes (0 = one per core). Linux/macOS only (fork)."""

    def __init__(self, pool: ClientPool, workers: int = 0) -> None:
        self.pool = pool
        self.workers = workers or os.cpu_count() or 1
        self._procs: list[tuple[Any, Connection]] = []
        self._local: LocalAlgorithm | None = None
        self._payloads = _Payloads()

    def _start(self, local: LocalAlgorithm) -> None:
        self.close()
        resource_tracker.ensure_running()  # before forking, so the workers share it
        ctx = mp.get_context("fork")
        for _ in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, self.pool, local), daemon=True)
            proc.start()
            child.close()
            self._procs.append((proc, parent))
        self._local = local

    def _publish(self, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        """Write every task's payloads (model, broadcast, client state) into shared memory,
        each distinct object once; return, per task, where each one lies.

        Task messages then stay a few hundred bytes, so the parent never blocks writing to a
        worker that is itself blocked writing a large reply back (a pipe deadlock)."""
        while True:
            try:
                return self._place(tasks)
            except _Grow as grow:
                self._payloads.grow(grow.size)

    def _place(self, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        self._payloads.reset()
        seen: dict[int, Location] = {}

        def put(value: Params) -> Location:
            if id(value) not in seen:
                seen[id(value)] = self._payloads.put(encode(value))
            return seen[id(value)]

        placed = []
        for task in tasks:
            state = self.pool.states.get(task.client_id, {})
            placed.append(
                {
                    "params": put(task.params),
                    "broadcast": [[n, put(p)] for n, p in task.broadcast.items()],
                    "state": [[n, put(p)] for n, p in state.items()],
                }
            )
        return placed

    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Yield one reply per task, in task order.

        A worker that dies fails the tasks it held (recorded as failures, the round goes on);
        the workers are restarted at the next dispatch. Closing the iterator early (a round
        that closed, see `Settings.over_selection`) waits for the tasks the workers are running
        and drops their replies; tasks not yet handed out never run. Any other exception
        (KeyboardInterrupt included) propagates at once, and the workers are restarted at the
        next dispatch.
        """
        if not tasks:
            return
        if not self._procs or self._local != local:
            self._start(local)
        where = self._publish(tasks)
        pending = deque(sorted(range(len(tasks)), key=lambda i: -self._size(tasks[i].client_id)))
        busy: dict[Connection, list[int]] = {conn: [] for _, conn in self._procs}
        done: dict[int, Reply] = {}

        def lose(conn: Connection) -> None:
            for index in busy.pop(conn):
                done[index] = lost(tasks[index], "its worker process died")
            self._local = None  # restart the workers at the next dispatch

        def feed(conn: Connection) -> None:
            if pending and not self._send(conn, pending[0], tasks[pending[0]], where):
                lose(conn)
            elif pending:
                busy[conn].append(pending.popleft())

        for conn in list(busy):
            feed(conn)
            if conn in busy:
                feed(conn)
        next_out = 0
        try:
            while next_out < len(tasks):
                active = [c for c, queue in busy.items() if queue]
                if not active:  # every worker died: the rest fail
                    while pending:
                        index = pending.popleft()
                        done[index] = lost(tasks[index], "no simulation worker left")
                for conn in typing.cast(list[Connection], wait(active) if active else []):
                    try:
                        index, reply, state = parse_reply(conn.recv_bytes())
                    except (EOFError, OSError):
                        lose(conn)
                        continue
                    busy[conn].remove(index)
                    self.pool.states[reply.client_id] = state
                    done[index] = reply
                    feed(conn)
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
        except GeneratorExit:  # closed at a `yield`: drop the replies the workers still owe
            self._drain(busy)
            raise
        except BaseException:
            # Interrupted anywhere else (Ctrl-C arrives between any two bytecodes): a reply may
            # have been read but not booked, or a task half sent, so waiting for what the
            # bookkeeping says is owed could wait forever. Restart the workers instead.
            self._local = None
            raise

    def _drain(self, busy: dict[Connection, list[int]]) -> None:
        """Receive and discard the replies of tasks still running (their client states are
        not kept), so the pipes and shared memory are clean for the next dispatch."""
        for conn, running in busy.items():
            for _ in running:
                try:
                    conn.recv_bytes()
                except (EOFError, OSError):
                    self._local = None  # restart the workers at the next dispatch
                    break

    def _size(self, client_id: str) -> int:
        trainer = self.pool.trainers.get(client_id)
        return int(getattr(trainer, "num_train_examples", 0) or 0)

    def _send(self, conn: Connection, index: int, task: Task, where: list[dict[str, Any]]) -> bool:
        """Send one task; False if the worker is gone."""
        fit = None
        if task.fit is not None:  # gradient_correction is set by the client half, not sent
            f = task.fit
            fit = {
                "round": f.round,
                "epochs": f.epochs,
                "batch_size": f.batch_size,
                "learning_rate": f.learning_rate,
                "seed": f.seed,
                "proximal_mu": f.proximal_mu,
            }
        head = {
            "i": index,
            "client": task.client_id,
            "kind": task.kind.value,
            **where[index],
            "fit": fit,
            "eval": asdict(task.evaluate) if task.evaluate is not None else None,
        }
        try:
            conn.send_bytes(pack(head, []))
        except OSError:
            return False
        return True

    def late_replies(self) -> list[Reply]:
        """None: every dispatched task is waited for, or its reply discarded when the dispatch is
        abandoned."""
        return []

    def client_states(self) -> dict[str, ClientState]:
        """Client-half states, kept in this process between rounds."""
        return self.pool.states

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Replace the states (workers receive them with each task)."""
        self.pool.states = dict(states)

    def close(self) -> None:
        """Stop the workers and free the shared memory. Idempotent."""
        for proc, conn in self._procs:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"")
            conn.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self._procs = []
        self._payloads.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
