"""Overhead of `TorchTrainer.fit` against hand-written PyTorch FedAvg client loops.

Each round of the measurement runs one local update per client, rotating over many clients that
share ONE module (as a simulation does), and times:

- `fedloom`: `TorchTrainer.fit(params, FitConfig(...))`, the full adapter call;
- `plain`: a tight hand-written loop: copy the global vector into the parameters,
  shuffle with `torch.randperm`, per batch `x[idx]`, forward, backward, `p.add_(p.grad, -lr)`,
  `p.grad = None`; delta as `parameters_to_vector(model) - global`;
- `optim`: the same loop written the usual way, with a fresh `torch.optim.SGD` per client.

Workloads (MNIST-sized random data, one thread): the 2NN 784-200-200-10 with 600 examples,
B=10, E=1; and a tiny MLP 784-32-10 with 60 examples, B=20, E=1.

Times are CPU time of this (single-threaded) process, `time.process_time`, so that other work
on a shared machine does not land in one variant's wall clock; variants are interleaved and the
median (and best) over repeats is reported.

Run: `PYTHONPATH=src python bench/adapter_overhead.py [--repeats 7]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector

from fedloom.adapters.torch_trainer import TorchTrainer
from fedloom.core.types import FitConfig

LR = 0.05


def make_model(hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def load_copy(global_vec: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy `global_vec` into `params` (`vector_to_parameters` would alias the vector)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(global_vec[offset : offset + n].view_as(p))
            offset += n


def plain_fit(
    model: nn.Module,
    global_vec: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    seed: int,
) -> torch.Tensor:
    """Tight hand-written client update; returns the delta vector."""
    params = list(model.parameters())
    load_copy(global_vec, params)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-LR)  # type: ignore[arg-type]
                p.grad = None
    return parameters_to_vector(params).detach() - global_vec


def optim_fit(
    model: nn.Module,
    global_vec: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    seed: int,
) -> torch.Tensor:
    """The usual way: a fresh `torch.optim.SGD` per client."""
    params = list(model.parameters())
    load_copy(global_vec, params)
    model.train()
    opt = torch.optim.SGD(params, lr=LR)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        opt.step()
    return parameters_to_vector(params).detach() - global_vec


def bench(name: str, hidden: list[int], n: int, batch: int, clients: int, repeats: int) -> None:
    torch.manual_seed(0)
    data = [(torch.randn(n, 784), torch.randint(0, 10, (n,))) for _ in range(clients)]
    model = make_model(hidden)
    trainers = [TorchTrainer(model, (x, y)) for x, y in data]
    params = trainers[0].initial_params()
    global_vec = torch.from_numpy(params.flat.copy())
    config = FitConfig(round=1, epochs=1, batch_size=batch, learning_rate=LR, seed=1)

    def run_fedloom() -> None:
        for t in trainers:
            t.fit(params, config)

    def run_plain() -> None:
        for x, y in data:
            plain_fit(model, global_vec, x, y, batch, 1)

    def run_optim() -> None:
        for x, y in data:
            optim_fit(model, global_vec, x, y, batch, 1)

    runs: dict[str, Callable[[], None]] = {
        "fedloom": run_fedloom,
        "plain": run_plain,
        "optim": run_optim,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm up
        fn()
    for _ in range(repeats):  # interleave so drift hits every variant alike
        for key, fn in runs.items():
            start = time.process_time()
            fn()
            times[key].append((time.process_time() - start) / clients)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"{name}: CPU time per client fit, median (best) of {repeats}")
    for key in runs:
        print(f"  {key:8s} {med[key] * 1e6:9.1f} us ({best[key] * 1e6:9.1f} us)")
    for base in ("plain", "optim"):
        ratio, best_ratio = med["fedloom"] / med[base], best["fedloom"] / best[base]
        print(f"  ratio fedloom/{base} = {ratio:.3f} ({best_ratio:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench("2NN 784-200-200-10, 600 ex, B=10", [200, 200], 600, 10, 20, args.repeats)
    bench("tiny MLP 784-32-10, 60 ex, B=20", [32], 60, 20, 1000, args.repeats)


if __name__ == "__main__":
    main()
