"""LEAF (Caldas et al. 2018): FEMNIST with LEAF's CNN and FedAvg, natural partition (one
client per writer, the shipped `leaf_niid_0.05` subset: 105 writers, 14,708 train and 1,685
test images), E=1, B=10, 10 clients per round: rounds and wall time to LEAF's 75% accuracy
threshold on the pooled test sets of all writers, evaluated centrally after every round.

Preprocessing: x -> 1 - x, nothing else. LEAF stores FEMNIST with a white background (1.0)
and dark strokes (mean pixel ~0.96); inverted, the background is 0 and the strokes carry the
signal, as in MNIST and most FEMNIST baselines. (For this CNN it is a mild help, not a
necessity: one epoch of central SGD, lr 0.05, B=10, on the pooled train set reached 75.7% test
accuracy inverted and 73.9% raw.)

LEAF's paper uses SGD at lr 0.004, which would need far more rounds than this budget allows;
the default here is lr 0.05, the rate checked centrally above, not tuned further for FedAvg.

Measured (seed 0, workers=2, on 2 CPU cores shared with other jobs, so wall times are
inflated): lr 0.05 reached 75% in 62 rounds (1020 s); lr 0.1 in 40 rounds (539 s).

Run: `FEDLOOM_DATA=/path/to/data python bench/repro/femnist_cnn.py [--max-rounds N] [--lr X]
[--clients-per-round K] [--workers N] [--seed S] [--progress]`. Prints one markdown row: rounds
to 75% (or the best accuracy reached), final accuracy, wall time and seconds per round;
`--progress` logs every round's accuracy to stderr.
"""

from __future__ import annotations

import argparse

import torch
from harness import femnist_clients, row, train

from fedloom import FedAvg, Settings
from fedloom.models import mnist_cnn

TARGET = 0.75


def run(
    max_rounds: int, lr: float, clients_per_round: int, workers: int, seed: int, progress: bool
) -> str:
    """Train until 75% or `max_rounds`; return a markdown table row."""
    torch.manual_seed(seed)
    clients, server = femnist_clients(mnist_cnn(num_classes=62, fc=2048))
    settings = Settings(
        rounds=max_rounds,
        fraction_fit=clients_per_round / len(clients),
        epochs=1,
        batch_size=10,
        learning_rate=lr,
        seed=seed,
        target_metric="accuracy",
        target_value=TARGET,
    )
    result, wall = train(FedAvg(), clients, server, settings, workers=workers, progress=progress)
    return row(f"fedavg, lr {lr:g}, {clients_per_round} clients/round", result, wall)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-rounds", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="log every round to stderr")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| setting | rounds to 75% | final acc. | wall s | s/round |")
    print("| --- | --- | --- | --- | --- |")
    print(
        run(
            args.max_rounds,
            args.lr,
            args.clients_per_round,
            args.workers,
            args.seed,
            args.progress,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
