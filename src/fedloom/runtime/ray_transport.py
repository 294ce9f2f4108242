"""Simulation across machines: the clients live in Ray actors spread over a Ray cluster.

What is sent where:

- Once, at start: the clients. Either the trainers themselves (a mapping or a `ClientPool`,
  put in the object store once and copied by each actor) or a factory, a picklable
  `Callable[[], Mapping[str, Trainer]]` each actor calls to build the clients itself (use a
  factory when the data lives on the workers or is too large to ship from the driver). The
  trainers (or factory) and the strategy's client half travel by Ray's own serializer
  (cloudpickle), once each; datasets are never re-sent.
- Each round: the global model and every broadcast vector go into the object store once, in
  fedloom's wire format; a task is a small wire-format message (config and the client's
  state); a reply is the wire-format message `ProcessTransport` uses. Never pickle per round.

Client states (for example SCAFFOLD's control variates) are kept here in the driver and sent
with each task, as `ProcessTransport` does. Tasks go to actors largest client first, each actor
holding at most two; replies are yielded in task order, so a run equals `InProcessTransport`
bit for bit for the same seed (on machines with the same software stack). An actor that dies
fails the tasks it held (a `Reply.failure`, never an exception) and is replaced next dispatch.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import ray

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, FitConfig, Reply, Task, TaskKind
from fedloom.core.wire import decode, encode
from fedloom.runtime.client import ClientPool
from fedloom.runtime.messages import lost, pack, parse_reply, reply_message, unpack

TrainerFactory = Callable[[], Mapping[str, Trainer]]
ClientSource = ClientPool | Mapping[str, Trainer] | TrainerFactory


class _Host:
    """One Ray actor: every client's trainer, running the tasks it is sent one at a time."""

    def __init__(self, source: Any, threads: int) -> None:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, threads))
        # A mapping arrives as a read-only view of the object store: copy it, so trainers may
        # write to their arrays (as each forked worker's copy-on-write pages would allow).
        trainers = source() if callable(source) else copy.deepcopy(source)
        self.pool = ClientPool(trainers)
        self.local: LocalAlgorithm | None = None
        self.cache: dict[str, Params] = {}
        self.generation = -1

    def sizes(self) -> dict[str, int]:
        """Each client's number of training examples (to balance tasks by data size)."""
        return {cid: _size(t) for cid, t in self.pool.trainers.items()}

    def node(self) -> str:
        """The id of the Ray node this actor lives on."""
        return str(ray.get_runtime_context().get_node_id())

    def set_local(self, local: LocalAlgorithm) -> None:
        """The strategy's client half for the tasks that follow."""
        self.local = local

    def run(self, message: bytes, refs: list[Any]) -> bytes:
        """One wire-format task in (its payloads in the object store), one reply out."""
        head, blobs = unpack(message)
        if head["gen"] != self.generation:  # a new dispatch: last one's payloads are gone
            self.cache.clear()
            self.generation = head["gen"]

        def payload(k: int) -> Params:
            key = refs[k].hex()
            if key not in self.cache:
                self.cache[key] = decode(ray.get(refs[k]))[0]
            return self.cache[key]

        kind = TaskKind(head["kind"])
        task = Task(
            head["client"],
            kind,
            payload(head["params"]),
            fit=FitConfig(**head["fit"]) if kind is TaskKind.FIT else None,
            evaluate=EvalConfig(**head["eval"]) if kind is TaskKind.EVALUATE else None,
            broadcast={name: payload(k) for name, k in head["broadcast"]},
        )
        state = {n: decode(b)[0] for n, b in zip(head["state"], blobs, strict=True)}
        self.pool.states[task.client_id] = state
        assert self.local is not None, "set_local before run"
        reply = self.pool.run(task, self.local)
        return reply_message(head["i"], reply, self.pool.states.pop(task.client_id, {}))


def _size(trainer: Trainer) -> int:
    return int(getattr(trainer, "num_train_examples", 0) or 0)


class RayTransport:
    """Runs tasks in `actors` Ray actors (0 = one per CPU of the cluster), each holding every
    client. `address`: None starts a local Ray instance (shut down again by `close`); "auto",
    "HOST:PORT" or "ray://HOST:PORT" connect to a running cluster. If Ray is already
    initialized in this process, that connection is used and left open. `runtime_env` is
    passed to `ray.init` (for example to ship code the workers cannot import).
    """

    def __init__(
        self,
        clients: ClientSource,
        *,
        address: str | None = None,
        actors: int = 0,
        num_cpus: float = 1.0,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        if actors < 0:
            raise ValueError(f"actors = {actors}: must be >= 0 (0 means one per cluster CPU)")
        self._owns_ray = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": "warning"}
            if address is None:
                options["include_dashboard"] = False
            ray.init(address=address, **options)
            self._owns_ray = True
        self.states: dict[str, ClientState] = {}
        if isinstance(clients, ClientPool):
            self.states = clients.states
            clients = clients.trainers
        self._sizes: dict[str, int] = {}
        if isinstance(clients, Mapping):
            if not clients:
                raise ValueError("a federation needs at least one client")
            self._sizes = {cid: _size(t) for cid, t in clients.items()}
            self._source: Any = ray.put(dict(clients))  # shipped once; actors copy it
        else:
            self._source = clients
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call,unused-ignore]
        cpus = int(resources.get("CPU", 1) // max(num_cpus, 1e-9))
        self.actors = actors or max(1, cpus)
        self._host = ray.remote(num_cpus=num_cpus, max_restarts=0)(_Host).options(
            scheduling_strategy="SPREAD"
        )
        self._threads = max(1, int(num_cpus))
        self._hosts: list[Any] = [None] * self.actors
        self._local: LocalAlgorithm | None = None
        self._generation = 0
        self._ensure_hosts()
        if not self._sizes:
            self._sizes = ray.get(self._hosts[0].sizes.remote())

    def _ensure_hosts(self) -> None:
        """(Re)start any actor that is missing or has died."""
        for k, host in enumerate(self._hosts):
            if host is None:
                self._hosts[k] = self._host.remote(self._source, self._threads)
                if self._local is not None:
                    self._hosts[k].set_local.remote(self._local)

    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Yield one reply per task, in task order (never raises for a client's failure)."""
        if not tasks:
            return
        self._ensure_hosts()
        if local != self._local:
            self._local = local
            for host in self._hosts:
                host.set_local.remote(local)  # actor calls run in order: before any task
        self._generation += 1
        messages, refs = self._encode(tasks)
        order = sorted(range(len(tasks)), key=lambda i: -self._sizes.get(tasks[i].client_id, 0))
        pending = list(reversed(order))  # pop() takes the largest
        running: dict[Any, tuple[int, int]] = {}  # reply ref -> (task index, host slot)
        load = [0] * len(self._hosts)
        done: dict[int, Reply] = {}

        def feed(slot: int, most: int = 2) -> None:
            while pending and load[slot] < most and self._hosts[slot] is not None:
                index = pending.pop()
                ref = self._hosts[slot].run.remote(messages[index], refs[index])
                running[ref] = (index, slot)
                load[slot] += 1

        for most in (1, 2):  # the largest task to each actor, then a second each
            for slot in range(len(self._hosts)):
                feed(slot, most)
        next_out = 0
        while next_out < len(tasks):
            if not running:  # every actor died: the rest fail
                while pending:
                    index = pending.pop()
                    done[index] = lost(tasks[index], "no Ray actor left")
            else:
                (ready,), _ = ray.wait(list(running), num_returns=1)
                index, slot = running.pop(ready)
                load[slot] -= 1
                done[index] = self._receive(ready, tasks[index], slot)
                feed(slot)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _receive(self, ref: Any, task: Task, slot: int) -> Reply:
        """The reply behind `ref`; an actor's death or error becomes the task's failure."""
        try:
            message = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._hosts[slot] = None  # replaced at the next dispatch
            return lost(task, f"its Ray actor died ({type(exc).__name__})")
        except ray.exceptions.RayError as exc:
            return lost(task, f"Ray failed the task: {type(exc).__name__}: {exc}"[:500])
        _, reply, state = parse_reply(bytes(message))
        self.states[reply.client_id] = state
        return reply

    def _encode(self, tasks: Sequence[Task]) -> tuple[list[bytes], list[list[Any]]]:
        """Put each distinct model/broadcast in the object store once; build the task messages
        (each with the client's state inline) and, per task, the object refs it needs."""
        placed: dict[int, Any] = {}

        def put(value: Params) -> Any:
            if id(value) not in placed:
                placed[id(value)] = ray.put(encode(value))
            return placed[id(value)]

        messages, refs = [], []
        for i, task in enumerate(tasks):
            needed = [put(task.params), *(put(p) for p in task.broadcast.values())]
            state = self.states.get(task.client_id, {})
            head = {
                "i": i,
                "gen": self._generation,
                "client": task.client_id,
                "kind": task.kind.value,
                "params": 0,
                "broadcast": [[name, k + 1] for k, name in enumerate(task.broadcast)],
                "state": list(state),
                "fit": _fit_fields(task.fit),
                "eval": asdict(task.evaluate) if task.evaluate is not None else None,
            }
            messages.append(pack(head, [encode(p) for p in state.values()]))
            refs.append(needed)
        return messages, refs

    def nodes(self) -> list[str | None]:
        """The Ray node id of each live actor (None where an actor died and awaits restart)."""
        live = [(k, h.node.remote()) for k, h in enumerate(self._hosts) if h is not None]
        found = dict(zip([k for k, _ in live], ray.get([r for _, r in live]), strict=True))
        return [found.get(k) for k in range(len(self._hosts))]

    def late_replies(self) -> list[Reply]:
        """None: a result that is not waited for is dropped unread."""
        return []

    def client_states(self) -> dict[str, ClientState]:
        """Client-half states, kept in the driver between rounds (live, not a copy)."""
        return self.states

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Replace the states (actors receive them with each task)."""
        self.states = dict(states)

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this transport started it. Idempotent."""
        for host in self._hosts:
            if host is not None:
                with contextlib.suppress(Exception):  # already gone, or the cluster is
                    ray.kill(host)
        self._hosts = [None] * len(self._hosts)
        self._source = None
        self._local = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _fit_fields(fit: FitConfig | None) -> dict[str, Any] | None:
    """A fit config as JSON fields (gradient_correction is set by the client half, not sent)."""
    if fit is None:
        return None
    return {
        "round": fit.round,
        "epochs": fit.epochs,
        "batch_size": fit.batch_size,
        "learning_rate": fit.learning_rate,
        "seed": fit.seed,
        "proximal_mu": fit.proximal_mu,
    }
