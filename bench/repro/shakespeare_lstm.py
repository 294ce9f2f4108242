"""LEAF Shakespeare (Caldas et al. 2018): next-character prediction, one client per play role,
FedAvg over a character LSTM, on a CPU-sized subset: test accuracy per round against the
majority-class baseline (always predict the most frequent training character, a space).

Subset (defaults): the first 100 roles in text order (`load_shakespeare(seq_len=80,
max_clients=100)`), at most 500 training windows per client drawn at random (seed 0), 10
clients per round (C=0.1), E=1, B=10, SGD lr 0.8 (LEAF's), and the test accuracy of the
server model on a fixed random 2000 windows of those roles' pooled test split. The model is
LEAF's (8-d embedding, 2-layer LSTM, seq 80) with hidden 128 instead of 256 to fit a 2-core
CPU. LEAF reaches about 0.4-0.5 after many rounds on all 1145 roles; this is a short run.
Measured with the defaults (100 rounds): 0.401 against a 0.167 baseline, ~10-17 s/round.

Run: `python bench/repro/shakespeare_lstm.py [--rounds N] [--clients K] [--lr X] [--hidden H]
[--workers N] [--cap M] [--test T] [--every R]`. Prints the baseline, a markdown table of the
test accuracy every `--every` rounds (round 0 is the initial model), wall time and s/round.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from harness import train

from fedloom import EvalConfig, FedAvg, RoundResult, Settings
from fedloom.adapters import TorchTrainer
from fedloom.data import ALL_LETTERS, ArrayDataset, load_shakespeare
from fedloom.models import CharLSTM


def subset(
    num_clients: int, cap: int, test_size: int, seed: int
) -> tuple[dict[str, ArrayDataset], ArrayDataset, int, int]:
    """(train per role capped at `cap` random windows, a fixed random test subset of the
    roles' pooled test split, vocabulary size, majority training character)."""
    fed = load_shakespeare(seq_len=80, max_clients=num_clients)
    rng = np.random.default_rng(seed)
    windows = {}
    for cid, (tr, _) in fed.clients.items():
        idx = (
            np.sort(rng.choice(len(tr), cap, replace=False))
            if len(tr) > cap
            else np.arange(len(tr))
        )
        windows[cid] = ArrayDataset(tr.x[idx], tr.y[idx])  # fancy indexing copies the strided view
    pooled = fed.pooled("test")
    idx = np.sort(rng.choice(len(pooled), min(test_size, len(pooled)), replace=False))
    test = ArrayDataset(pooled.x[idx], pooled.y[idx])
    counts = np.bincount(np.concatenate([d.y for d in windows.values()]), minlength=fed.num_classes)
    return windows, test, fed.num_classes, int(counts.argmax())


def run(args: argparse.Namespace) -> None:
    """Train, print the baseline, the accuracy table and the timing."""
    parts, test, vocab, majority = subset(args.clients, args.cap, args.test, args.seed)
    baseline = float(np.mean(test.y == majority))
    torch.manual_seed(args.seed)
    model = CharLSTM(vocab=vocab, embed=8, hidden=args.hidden, layers=2)
    clients = {cid: TorchTrainer(model, (d.x, d.y)) for cid, d in parts.items()}
    server = TorchTrainer(model, (test.x[:1], test.y[:1]), (test.x, test.y))
    settings = Settings(
        rounds=args.rounds,
        fraction_fit=args.fraction,
        epochs=1,
        batch_size=10,
        learning_rate=args.lr,
        seed=args.seed,
    )
    n_train = sum(len(d) for d in parts.values())
    print(
        f"{len(parts)} roles, {n_train} training windows (cap {args.cap}/role), "
        f"{len(test)} test windows, vocab {vocab}; hidden {args.hidden}, lr {args.lr}, "
        f"C={args.fraction}, E=1, B=10, {args.workers} workers",
        flush=True,
    )
    initial = server.initial_params()
    accuracy = {0: server.evaluate(initial, EvalConfig(0)).metrics["accuracy"]}

    def record(result: RoundResult) -> None:
        accuracy[result.record.round] = result.record.metrics["accuracy"]

    result, wall = train(
        FedAvg(), clients, server, settings, workers=args.workers, progress=True, on_round=record
    )
    rounds = len(result.history)
    print(f"\nmajority-class baseline (always {ALL_LETTERS[majority]!r}): {baseline:.4f}\n")
    print("| round | test accuracy |")
    print("| --- | --- |")
    for r, acc in accuracy.items():
        if r % args.every == 0 or r == rounds:
            print(f"| {r} | {acc:.4f} |")
    print(f"\nbest {max(accuracy.values()):.4f}; wall {wall:.0f} s, {wall / rounds:.2f} s/round")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=100, help="first K roles")
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cap", type=int, default=500, help="training windows per role")
    parser.add_argument("--test", type=int, default=2000, help="test windows (pooled)")
    parser.add_argument("--fraction", type=float, default=0.1, help="clients per round (C)")
    parser.add_argument("--every", type=int, default=5, help="table row every N rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
