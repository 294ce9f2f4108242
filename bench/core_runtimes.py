"""The runtimes `bench/core.py` compares: a plain PyTorch FedAvg "floor", two copies of it
at once, and fedloom's `Federation.simulation`, over the same MNIST workloads and seeds."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedloom import FedAvg, Federation, Params, Settings
from fedloom.adapters.torch_trainer import TorchTrainer
from fedloom.core.types import Metrics
from fedloom.data import ArrayDataset, iid, shards
from fedloom.models import mlp
from fedloom.runtime.federation import RoundResult
from fedloom.runtime.selection import client_seed, round_rng, select_clients

SEED = 0

#: Named tensors of one model, in `state_dict` order (what the floor moves around).
TensorDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One federated MNIST training setup, shared by the floor and fedloom."""

    hidden: tuple[int, ...]
    split: Literal["shards", "iid"]  # shards: McMahan's 2 label-sorted shards per client
    n_clients: int
    per_round: int
    batch: int
    lr: float
    epochs: int = 1

    def settings(self, rounds: int, target_accuracy: float | None = None) -> Settings:
        """fedloom settings for this workload, stopping early at `target_accuracy` if set."""
        return Settings(
            rounds=rounds,
            fraction_fit=self.per_round / self.n_clients,
            epochs=self.epochs,
            batch_size=self.batch,
            learning_rate=self.lr,
            seed=SEED,
            target_metric=None if target_accuracy is None else "accuracy",
            target_value=target_accuracy,
        )


MNIST_2NN = Workload((200, 200), "shards", 100, 10, batch=10, lr=0.1)
OVERHEAD = Workload((32,), "iid", 1000, 100, batch=20, lr=0.1)
LEARNING = Workload((200, 200), "iid", 100, 10, batch=10, lr=0.1)


@dataclass
class Setup:
    """A workload made concrete: client data as tensors, one trainer per client, the model."""

    workload: Workload
    clients: list[tuple[torch.Tensor, torch.Tensor]]
    trainers: dict[str, TorchTrainer]
    init: TensorDict
    test: tuple[torch.Tensor, torch.Tensor]

    @property
    def init_params(self) -> Params:
        """The initial model as fedloom `Params` (same values as `init`)."""
        return Params.from_arrays({k: v.numpy() for k, v in self.init.items()})


def build(w: Workload, train: ArrayDataset, test: ArrayDataset) -> Setup:
    """Partition MNIST, seed the model, and wrap every client's part in a `TorchTrainer`."""
    if w.split == "shards":
        parts = shards(train.y, w.n_clients, SEED)
    else:
        parts = iid(len(train), w.n_clients, SEED)
    clients = [(torch.from_numpy(train.x[p]), torch.from_numpy(train.y[p])) for p in parts]
    torch.manual_seed(SEED)
    model = new_model(w)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainers = {f"c{i:04d}": TorchTrainer(model, train=xy) for i, xy in enumerate(clients)}
    return Setup(w, clients, trainers, init, (torch.from_numpy(test.x), torch.from_numpy(test.y)))


def new_model(w: Workload) -> nn.Module:
    """A fresh MLP of the workload's shape (784 inputs, 10 classes)."""
    return mlp(784, list(w.hidden), 10)


def accuracy(
    model: nn.Module, weights: TensorDict, test: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Test accuracy of `weights` loaded into `model`."""
    model.load_state_dict(weights)
    with torch.no_grad():
        return float((model(test[0]).argmax(dim=1) == test[1]).double().mean())


def as_tensors(params: Params) -> TensorDict:
    """fedloom `Params` as named tensors (views, no copy)."""
    return {k: torch.from_numpy(v) for k, v in params.items()}


# ------------------------------------------------------------------------- the floor: plain


def draw_clients(round_number: int, n_clients: int, per_round: int) -> list[int]:
    """The clients of one round: the same seeded draw fedloom makes (checked in `main`)."""
    rng = np.random.default_rng([SEED, round_number, 0, 0])
    return [int(i) for i in rng.choice(n_clients, size=per_round, replace=False)]


def local_seed(round_number: int, client: int) -> int:
    """A client's shuffling seed in one round: the same derivation fedloom uses."""
    state = np.random.SeedSequence([SEED, round_number, client, 7]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


class Floor:
    """FedAvg written the plain PyTorch way, one round per `step`.

    Per client: copy the global weights into the model, shuffle with a seeded `randperm`,
    mini-batch SGD (`backward`, then `p -= lr * p.grad`); the new global model is the
    example-weighted mean of the client models. Same clients, seeds and arithmetic as fedloom.
    """

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.model = new_model(setup.workload)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.weights = [setup.init[name].clone() for name in self.names]

    def step(self, number: int) -> float:
        """Run round `number`; return its seconds."""
        start = time.perf_counter()
        w, params = self.setup.workload, self.params
        sums = [torch.zeros_like(p) for p in params]
        total = 0
        for k in draw_clients(number, w.n_clients, w.per_round):
            x, y = self.setup.clients[k]
            n = len(x)
            with torch.no_grad():
                for p, g in zip(params, self.weights, strict=True):
                    p.copy_(g)
            gen = torch.Generator().manual_seed(local_seed(number, k))
            for _ in range(w.epochs):
                perm = torch.randperm(n, generator=gen)
                xs, ys = x.index_select(0, perm), y.index_select(0, perm)
                batches = zip(xs.split(w.batch), ys.split(w.batch), strict=True)  # type: ignore[no-untyped-call]
                for xb, yb in batches:
                    for p in params:
                        p.grad = None
                    F.cross_entropy(self.model(xb), yb).backward()  # type: ignore[no-untyped-call]
                    with torch.no_grad():
                        for p in params:
                            p.sub_(p.grad, alpha=w.lr)  # type: ignore[arg-type]
            with torch.no_grad():
                for s, p in zip(sums, params, strict=True):
                    s.add_(p, alpha=n)
            total += n
        self.weights = [s.div_(total) for s in sums]
        return time.perf_counter() - start

    @property
    def final(self) -> TensorDict:
        """The current global model."""
        return dict(zip(self.names, self.weights, strict=True))


def _pair_worker(conn: Connection, setup: Setup) -> None:
    """One copy of the floor in a forked process: a round number in, its seconds out."""
    torch.set_num_threads(1)
    floor = Floor(setup)
    while (number := conn.recv()) is not None:
        conn.send(floor.step(number))


class FloorPair:
    """Two forked copies of `Floor` stepped together: the most any two processes can do here.

    Their slowdown against one copy alone is the hardware's (shared caches and memory
    bandwidth, or virtual CPUs that are not whole cores), not any runtime's.
    """

    def __init__(self, setup: Setup) -> None:
        ctx = mp.get_context("fork")
        self.procs: list[tuple[BaseProcess, Connection]] = []
        for _ in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_pair_worker, args=(child, setup), daemon=True)
            proc.start()
            child.close()
            self.procs.append((proc, parent))

    def step(self, number: int) -> list[float]:
        """Run round `number` in both copies at once; return each copy's seconds."""
        for _, conn in self.procs:
            conn.send(number)
        return [float(conn.recv()) for _, conn in self.procs]

    def close(self) -> None:
        """Stop both copies."""
        for proc, conn in self.procs:
            conn.send(None)
            proc.join()


# ------------------------------------------------------------------------------- fedloom


@dataclass
class Run:
    """One timed fedloom run: per round, its wall seconds and the seconds its clients spent in
    `run_task` (summed over clients); and the final model."""

    times: list[float]
    client_seconds: list[float]
    params: Params


def fedloom_run(
    setup: Setup,
    rounds: int,
    workers: int,
    evaluate_fn: Callable[[Params], Metrics] | None = None,
    between: Callable[[int], None] | None = None,
    target_accuracy: float | None = None,
) -> Run:
    """`Federation.simulation` with FedAvg, timed round by round.

    A round's time is the wall clock from the end of the previous round (or the start of
    `run`) to the end of this one. `between(round)`, if given, runs after each round, off
    fedloom's clock: it interleaves the other runtimes round by round.
    """
    times: list[float] = []
    client_seconds: list[float] = []
    last = 0.0

    def on_round(result: RoundResult) -> None:
        nonlocal last
        times.append(time.perf_counter() - last)
        client_seconds.append(sum(c.seconds for c in result.record.clients if c.kind == "fit"))
        if between is not None:
            between(result.record.round)
        last = time.perf_counter()

    config = setup.workload.settings(rounds, target_accuracy)
    with Federation.simulation(
        FedAvg(),
        setup.trainers,
        config,
        workers=workers,
        on_round=on_round,
        evaluate_fn=evaluate_fn,
    ) as fed:
        last = time.perf_counter()
        result = fed.run(setup.init_params)
    return Run(times, client_seconds, result.state.params)


def check_floor_draws(n_clients: int, per_round: int) -> None:
    """Fail loudly if the floor's client draw or local seeds ever diverge from fedloom's."""
    ids = [str(i) for i in range(n_clients)]
    for number in (1, 2, 3):
        theirs = select_clients(ids, per_round / n_clients, 1, round_rng(SEED, number, 0))
        if [int(i) for i in theirs] != draw_clients(number, n_clients, per_round):
            raise AssertionError("floor and fedloom select different clients")
        if local_seed(number, 5) != client_seed(SEED, number, 5):
            raise AssertionError("floor and fedloom derive different local seeds")
