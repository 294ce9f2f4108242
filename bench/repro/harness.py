"""What the reproductions share: a simulated federation of `TorchTrainer` clients evaluated
on a central test set after every round, a progress line per round on stderr, and the result
as a markdown row. The test suite's short versions use it too (tests/conftest.py puts
bench/repro on the import path)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Literal

from torch import nn

from fedloom import EvalConfig, Federation, RoundResult, RunResult, Settings, Strategy
from fedloom.adapters import TorchTrainer
from fedloom.data import load_femnist, load_mnist, partition


def log_round(result: RoundResult) -> None:
    """One line per round on stderr (stdout carries the markdown table)."""
    m = result.record.metrics
    print(
        f"round {result.record.round}: accuracy {m.get('accuracy', float('nan')):.4f}, "
        f"train loss {m.get('train_loss', float('nan')):.4f}, {result.record.seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def train(
    strategy: Strategy,
    clients: Mapping[str, TorchTrainer],
    server: TorchTrainer,
    settings: Settings,
    *,
    workers: int = 2,
    progress: bool = False,
    on_round: Callable[[RoundResult], None] | None = None,
) -> tuple[RunResult, float]:
    """Run `settings` from `server`'s current weights, evaluating on `server`'s test data after
    every evaluated round; returns the result and the wall seconds of the run."""

    def each_round(result: RoundResult) -> None:
        if progress:
            log_round(result)
        if on_round is not None:
            on_round(result)

    start = time.perf_counter()
    with Federation.simulation(
        strategy,
        clients,
        settings,
        workers=workers,
        evaluate_fn=lambda params: server.evaluate(params, EvalConfig(round=0)).metrics,
        on_round=each_round,
    ) as federation:
        result = federation.run(server.initial_params())
    return result, time.perf_counter() - start


def row(label: str, result: RunResult, wall: float) -> str:
    """`| label | rounds to the target (or the best accuracy) | final acc. | wall s | s/round |`."""
    acc = result.metric("accuracy")
    reached = (
        f"{len(acc)}" if result.stopped == "target" else f"not in {len(acc)} (best {max(acc):.4f})"
    )
    return f"| {label} | {reached} | {acc[-1]:.4f} | {wall:.0f} | {wall / len(acc):.2f} |"


def mcmahan_clients(
    model: nn.Module, split: Literal["iid", "shards"], *, test_size: int | None = None
) -> tuple[dict[str, TorchTrainer], TorchTrainer]:
    """McMahan et al.'s MNIST federation around `model`: 100 clients of 600 images, IID or 2
    label-sorted shards each (seed 0), and a server trainer holding the MNIST test set (its
    first `test_size` images, if given)."""
    train_set, test_set = load_mnist()
    parts = (
        partition.iid(len(train_set), 100, seed=0)
        if split == "iid"
        else partition.shards(train_set.y, 100, seed=0, shards_per_client=2)
    )
    clients = {
        f"c{i:02d}": TorchTrainer(model, (train_set.x[idx], train_set.y[idx]))
        for i, idx in enumerate(parts)
    }
    test = (test_set.x[:test_size], test_set.y[:test_size])
    return clients, TorchTrainer(model, test, test)


def femnist_clients(model: nn.Module) -> tuple[dict[str, TorchTrainer], TorchTrainer]:
    """LEAF FEMNIST around `model`: one client per writer (natural partition) and a server
    trainer holding the pooled test sets of all writers; images inverted to `1 - x` (LEAF
    stores a white background)."""
    data = load_femnist()
    clients = {
        writer: TorchTrainer(model, (1.0 - part.x, part.y))
        for writer, (part, _) in data.clients.items()
    }
    test = data.pooled("test")
    inverted = (1.0 - test.x, test.y)
    return clients, TorchTrainer(model, inverted, inverted)
