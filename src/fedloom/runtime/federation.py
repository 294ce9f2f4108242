"""The round loop: select, dispatch, validate, aggregate, update, evaluate, record, checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fedloom.algorithms.base import ServerState, Strategy
from fedloom.core.params import Layout, Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, FitConfig, Metrics, Reply, Task, TaskKind
from fedloom.runtime.aggregate import check_update
from fedloom.runtime.client import ClientPool
from fedloom.runtime.rounds import FitCollector, over_select, restore_states
from fedloom.runtime.selection import SelectionError, client_seeds, round_rng, select_clients
from fedloom.runtime.settings import Settings as Settings  # also importable from here
from fedloom.runtime.transport import Transport
from fedloom.store import (
    ClientRecord,
    Rejection,
    RoundRecord,
    RunStore,
    checkpoint_path,
    load_checkpoint,
    prune,
    save_checkpoint,
    save_model,
)


class RoundFailed(RuntimeError):
    """A round could not gather enough valid updates, even after its retries."""


@dataclass
class _Tally:
    """What a round has seen so far: accepted clients, rejections, selections and traffic."""

    clients: list[ClientRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    selected: int = 0
    down: int = 0
    up: int = 0

    def traffic(self, reply: Reply) -> None:
        self.down += reply.bytes_down
        self.up += reply.bytes_up


@dataclass(frozen=True)
class RoundResult:
    """What one round did (also what the run store keeps)."""

    record: RoundRecord
    state: ServerState


@dataclass
class RunResult:
    """A finished (or stopped) run: its id in the store, final state and per-round records."""

    run_id: str | None
    state: ServerState
    history: list[RoundRecord] = field(default_factory=list)
    stopped: str = "rounds"
    model_path: Path | None = None

    def metric(self, name: str) -> list[float]:
        """The per-round values of one metric (rounds that lack it are skipped)."""
        return [r.metrics[name] for r in self.history if name in r.metrics]


class Federation:
    """Runs a strategy over the clients behind a transport.

    `client_ids` are every client the transport can reach; `available(round)` (optional) says
    which of them may be selected in a round. `evaluate_fn(params)` (optional) is the
    centralized evaluation on a server-side test set. With a `store` and `run_dir`, every round
    is checkpointed (into `run_dir / <run id>`) and recorded, and `resume` continues a run from
    its last checkpoint.
    """

    def __init__(
        self,
        strategy: Strategy,
        transport: Transport,
        client_ids: Sequence[str],
        settings: Settings,
        *,
        evaluate_fn: Callable[[Params], Metrics] | None = None,
        available: Callable[[int], Collection[str]] | None = None,
        store: RunStore | None = None,
        run_dir: Path | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("client ids must be unique")
        if settings.min_fit_clients > len(client_ids):
            raise ValueError(
                f"min_fit_clients = {settings.min_fit_clients} exceeds the "
                f"{len(client_ids)} clients of this federation"
            )
        if (store is None) != (run_dir is None):
            raise ValueError("store and run_dir must be given together")
        self.strategy = strategy
        self.transport = transport
        self.client_ids = list(client_ids)
        self._index = {cid: i for i, cid in enumerate(self.client_ids)}
        self.settings = settings
        self.evaluate_fn = evaluate_fn
        self.available = available
        self.store = store
        self.run_dir = run_dir
        self.on_round = on_round
        #: The run store's id of the current (or last) run; None without a store.
        self.run_id: str | None = None

    @classmethod
    def simulation(
        cls,
        strategy: Strategy,
        trainers: Mapping[str, Trainer],
        settings: Settings,
        *,
        workers: int = 1,
        vectorized: bool = False,
        **options: Any,
    ) -> Federation:
        """A federation of simulated clients in this machine: `workers=1` runs them in this
        process, `workers=N` in N forked processes, `workers=0` one process per core.
        `vectorized=True` trains a round's clients in lockstep as batched PyTorch computations
        in this process (small models; anything else falls back with a warning), then
        `workers` is the number of threads that run chunks of clients at once.
        `options` are the keyword arguments of the constructor."""
        from fedloom.runtime.processes import ProcessTransport
        from fedloom.runtime.transport import InProcessTransport

        pool = ClientPool(trainers)
        transport: Transport
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if vectorized:
            from fedloom.runtime.vectorized import VectorizedTransport

            transport = VectorizedTransport(pool, threads=workers or os.cpu_count() or 1)
        elif workers == 1:
            transport = InProcessTransport(pool)
        else:
            transport = ProcessTransport(pool, workers=workers)
        return cls(strategy, transport, list(trainers), settings, **options)

    def close(self) -> None:
        """Release the transport (worker processes, connections)."""
        self.transport.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public entry points --------------------------------------------------------------------
    def run(
        self, initial: Params, *, name: str = "run", config: dict[str, Any] | None = None
    ) -> RunResult:
        """Start a new run from `initial` and train until a stopping rule fires."""
        state = self.strategy.init(initial)
        self.run_id = None
        if self.store is not None and self.run_dir is not None:
            self.run_id = self.store.create_run(
                name, config or {}, self.settings.seed, str(self.run_dir)
            )
        return self._loop(state, self.run_id, [])

    def resume(self, run_id: str) -> RunResult:
        """Continue `run_id` from its last checkpoint; equals the uninterrupted run."""
        if self.store is None:
            raise ValueError("resume needs a run store")
        found = self.store.last_checkpoint(run_id)
        if found is None:
            raise ValueError(f"run {run_id} has no checkpoint to resume from")
        self.run_id = run_id
        round_done, path = found
        state, client_states, _ = load_checkpoint(path)
        self.store.truncate_after(run_id, round_done)
        self.store.set_status(run_id, "running")
        self.transport.restore_client_states(client_states)
        return self._loop(state, run_id, list(self.store.rounds(run_id)))

    # -- the loop -------------------------------------------------------------------------------
    def _loop(
        self, state: ServerState, run_id: str | None, history: list[RoundRecord]
    ) -> RunResult:
        result = RunResult(run_id, state, history)
        try:
            while state.round < self.settings.rounds:
                round_result = self._round(state)
                state = round_result.state
                record = self._persist(run_id, round_result)
                history.append(record)
                result.state = state
                if self.on_round is not None:
                    self.on_round(RoundResult(record, state))
                if self._target_reached(record.metrics):
                    result.stopped = "target"
                    break
        except KeyboardInterrupt:
            self._set_status(run_id, "interrupted", "interrupted by the user")
            raise
        except (RoundFailed, SelectionError) as exc:
            self._set_status(run_id, "failed", str(exc))
            raise
        if self.store is not None and self.run_dir is not None and run_id is not None:
            result.model_path = self.run_dir / run_id / "model.safetensors"
            save_model(result.model_path, state.params, {"round": str(state.round)})
            self.store.set_status(run_id, "finished", model_path=str(result.model_path))
        return result

    def _round(self, state: ServerState) -> RoundResult:
        s = self.settings
        number = state.round + 1
        start = time.perf_counter()
        tally = _Tally()
        for attempt in range(s.max_retries + 1):
            # Client-half states (SCAFFOLD's c_i) as they were before the attempt: a discarded
            # attempt must not leave its clients' states advanced. States are replaced, never
            # mutated (the `LocalAlgorithm` contract), so copying each client's dict suffices.
            # (Only taken when a retry can follow: it walks every client's state.)
            retry_possible = attempt < s.max_retries
            before = (
                {cid: dict(st) for cid, st in self.transport.client_states().items() if st}
                if retry_possible
                else {}
            )
            fit = self._fit(state, number, attempt, tally)
            if fit.num_accepted >= s.replies_needed:
                break
            tally.clients.clear()  # the attempt's updates are discarded with it
            if retry_possible:
                self.transport.restore_client_states(before)
        else:
            raise RoundFailed(
                f"round {number}: {fit.num_accepted} valid update(s), {s.replies_needed} needed, "
                f"after {s.max_retries + 1} attempt(s); last rejections: "
                + "; ".join(f"{r.client_id}: {r.reason}" for r in tally.rejections[-5:])
            )
        aggregate = fit.result()
        new_state = self.strategy.update(state, aggregate)
        metrics: Metrics = {
            k if k.startswith("train_") else f"train_{k}": v for k, v in aggregate.metrics.items()
        }
        if number % s.evaluate_every == 0 or number == s.rounds:
            metrics.update(self._evaluate(new_state.params, number, tally))
        record = RoundRecord(
            round=number,
            metrics=metrics,
            num_selected=tally.selected,
            num_accepted=aggregate.num_clients,
            bytes_down=tally.down,
            bytes_up=tally.up,
            seconds=time.perf_counter() - start,
            checkpoint=None,
            clients=tuple(tally.clients),
            rejections=tuple(tally.rejections),
        )
        return RoundResult(record, new_state)

    def _fit(self, state: ServerState, number: int, attempt: int, tally: _Tally) -> FitCollector:
        """One attempt at a round's training: select (over-selecting if configured), dispatch,
        validate, aggregate; stop consuming the dispatch once the target is accepted."""
        s = self.settings
        layout = state.params.layout
        local = self.strategy.local
        extras: dict[str, Layout] = {name: layout for name in local.extra_names}
        broadcast = self.strategy.broadcast(state)
        rng = round_rng(s.seed, number, attempt)
        target, picked = over_select(
            self._available(number), s.fraction_fit, s.min_fit_clients, s.over_selection, rng
        )
        tally.selected += len(picked)
        seeds = client_seeds(s.seed, number, [self._index[cid] for cid in picked])
        tasks = [
            Task(cid, TaskKind.FIT, state.params, self._fit_config(number, seed), None, broadcast)
            for cid, seed in zip(picked, seeds, strict=True)
        ]
        fit = FitCollector(picked, target, layout, extras, ordered=s.ordered_aggregation)
        # States of the picked clients before the dispatch (replaced, never mutated: references
        # suffice), for the over-selected clients whose replies the closed round does not use.
        states = self.transport.client_states() if len(picked) > target else {}
        before = {cid: states[cid] for cid in picked if cid in states}
        replies = self.transport.dispatch(tasks, local)
        try:
            for reply in replies:
                tally.traffic(reply)
                reason = fit.replied(reply.client_id) or self._reject_reason(reply, layout, extras)
                if reason is not None:
                    tally.rejections.append(Rejection(reply.client_id, reason))
                    continue
                assert reply.update is not None
                fit.accept(reply.client_id, reply.update)
                tally.clients.append(self._client_record(reply, "fit"))
                if fit.full and len(tasks) > target:
                    break  # over-selected: the round closes with its target
        finally:
            close = getattr(replies, "close", None)
            if close is not None:  # a generator: its `finally` forgets the pending tasks
                close()
        unused = fit.unused()
        why = f"over-selected: the round closed with {fit.num_accepted} updates"
        tally.rejections.extend(Rejection(cid, why) for cid in unused)
        if unused:  # their tasks may have run: they keep the states they had (or none)
            restore_states(self.transport, unused, before)
        self._record_late(tally)
        return fit

    def _record_late(self, tally: _Tally) -> None:
        """Record the transport's late replies (never aggregated) as rejections of this round;
        their traffic counts."""
        for reply in self.transport.late_replies():
            tally.traffic(reply)
            why = (
                "late reply discarded"
                if reply.failure is None
                else f"discarded: {reply.failure.reason}"
            )
            tally.rejections.append(Rejection(reply.client_id, why))

    def _fit_config(self, number: int, seed: int) -> FitConfig:
        s = self.settings
        return FitConfig(
            round=number,
            epochs=s.epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            seed=seed,
        )

    def _available(self, number: int) -> list[str]:
        if self.available is None:
            return self.client_ids
        allowed = set(self.available(number))
        return [cid for cid in self.client_ids if cid in allowed]

    @staticmethod
    def _reject_reason(reply: Reply, layout: Layout, extras: dict[str, Layout]) -> str | None:
        if reply.failure is not None:
            return reply.failure.reason
        if reply.update is None:
            return "reply carries no update"
        return check_update(reply.update, layout, extras)

    @staticmethod
    def _client_record(reply: Reply, kind: str) -> ClientRecord:
        metrics = reply.update.metrics if reply.update is not None else {}
        n = reply.update.num_examples if reply.update is not None else 0
        if reply.evaluation is not None:
            metrics, n = reply.evaluation.metrics, reply.evaluation.num_examples
        return ClientRecord(
            client_id=reply.client_id,
            kind=kind,
            num_examples=int(n),
            metrics={k: float(v) for k, v in metrics.items()},
            seconds=reply.seconds,
            bytes_down=reply.bytes_down,
            bytes_up=reply.bytes_up,
        )

    def _evaluate(self, params: Params, number: int, tally: _Tally) -> Metrics:
        """Centralized metrics, plus example-weighted federated metrics prefixed `federated_`;
        failed evaluations are recorded as rejections and left out."""
        s = self.settings
        metrics: Metrics = {}
        if self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(params))
        if s.fraction_evaluate == 0:
            return metrics
        rng = round_rng(s.seed, number, 0, 1)
        picked = select_clients(
            self._available(number), s.fraction_evaluate, s.min_evaluate_clients, rng
        )
        tasks = [
            Task(cid, TaskKind.EVALUATE, params, evaluate=EvalConfig(number)) for cid in picked
        ]
        totals: dict[str, float] = {}
        examples = 0
        for reply in self.transport.dispatch(tasks, self.strategy.local):
            tally.traffic(reply)
            ev = reply.evaluation
            if ev is None or ev.num_examples <= 0:
                why = reply.failure.reason if reply.failure else "no evaluation returned"
                tally.rejections.append(Rejection(reply.client_id, f"evaluate: {why}"))
                continue
            tally.clients.append(self._client_record(reply, "evaluate"))
            examples += ev.num_examples
            for k, v in ev.metrics.items():
                totals[k] = totals.get(k, 0.0) + ev.num_examples * float(v)
        self._record_late(tally)
        if examples:
            metrics.update({f"federated_{k}": v / examples for k, v in totals.items()})
        return metrics

    def _target_reached(self, metrics: Metrics) -> bool:
        s = self.settings
        if s.target_metric is None or s.target_value is None or s.target_metric not in metrics:
            return False
        value = metrics[s.target_metric]
        return value >= s.target_value if s.target_mode == "max" else value <= s.target_value

    def _persist(self, run_id: str | None, result: RoundResult) -> RoundRecord:
        record = result.record
        if self.store is None or self.run_dir is None or run_id is None:
            return record
        path = checkpoint_path(self.run_dir / run_id, record.round)
        save_checkpoint(path, result.state, self.transport.client_states())
        record = replace(record, checkpoint=str(path))
        self.store.record_round(run_id, record)
        prune(self.run_dir / run_id, self.settings.keep_checkpoints)
        return record

    def _set_status(
        self, run_id: str | None, status: Literal["interrupted", "failed"], message: str
    ) -> None:
        if self.store is not None and run_id is not None:
            self.store.set_status(run_id, status, message=message)
