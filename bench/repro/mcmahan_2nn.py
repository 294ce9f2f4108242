"""McMahan et al. 2017, Table 1: MNIST 2NN, pathological non-IID (2 shards per client),
E=1, B=10, C=0.1: rounds to 97% test accuracy (published: 664 for FedAvg). Also the server
optimizers and SCAFFOLD on the same workload.

Run: `python bench/repro/mcmahan_2nn.py [--strategy NAME ...] [--max-rounds N] [--iid]`.
Prints one markdown row per strategy: rounds to the target (or the best accuracy reached),
wall time and seconds per round.
"""

from __future__ import annotations

import argparse

import torch
from harness import mcmahan_clients, row, train

from fedloom import FedAdam, FedAvg, FedAvgM, Scaffold, Settings, Strategy
from fedloom.models import mlp

#: One configuration per strategy; not tuned beyond a guess (say so when reporting).
STRATEGIES: dict[str, Strategy] = {
    "fedavg": FedAvg(),
    "fedavgm": FedAvgM(server_lr=1.0, momentum=0.5),
    "fedadam": FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
    "scaffold": Scaffold(num_clients=100),
}


def run(name: str, max_rounds: int, iid: bool, lr: float, workers: int) -> str:
    """Train until 97% or `max_rounds`; return a markdown table row."""
    torch.manual_seed(0)
    clients, server = mcmahan_clients(mlp(784, [200, 200], 10), "iid" if iid else "shards")
    settings = Settings(
        rounds=max_rounds,
        fraction_fit=0.1,
        epochs=1,
        batch_size=10,
        learning_rate=lr,
        seed=0,
        target_metric="accuracy",
        target_value=0.97,
    )
    result, wall = train(STRATEGIES[name], clients, server, settings, workers=workers)
    return row(name, result, wall)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", action="append", choices=sorted(STRATEGIES))
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--iid", action="store_true")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| strategy | rounds to 97% | final acc. | wall s | s/round |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.strategy or list(STRATEGIES):
        print(run(name, args.max_rounds, args.iid, args.lr, args.workers), flush=True)


if __name__ == "__main__":
    main()
