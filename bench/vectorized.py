"""Vectorized simulation benchmark: `VectorizedTransport` on the overhead-bound workload (b).

1000 IID MNIST clients of 60 examples, 100 per round, MLP 784-32-10, E=1, B=20, lr=0.1, FedAvg.
Median seconds per round of (1) the floor (`bench/core_runtimes.py`: a plain sequential PyTorch
loop, one thread), (2) fedloom in-process sequential (`workers=1`, one thread), (3) fedloom
`VectorizedTransport` on one thread and (4) on two threads that each run half of the round's
clients (`threads=2`, one torch thread each); plus the test accuracy each runtime reaches.
Every fedloom pass is interleaved round by round with the floor (the floor runs the same round
off fedloom's clock, always on one thread), ratios are medians of per-round ratios, and the
first round of every pass is a warm-up and dropped (as in `bench/core.py`).

Run (timed runs hold the shared lock): `flock /tmp/fedloom-bench.lock python bench/vectorized.py
[--rounds N]`.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy and torch start their thread pools

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from core_runtimes import (  # noqa: E402
    OVERHEAD,
    Floor,
    Run,
    Setup,
    accuracy,
    as_tensors,
    build,
    check_floor_draws,
    fedloom_run,
    new_model,
)
from fedloom import ClientPool, FedAvg, Federation  # noqa: E402
from fedloom.data import data_dir, load_mnist  # noqa: E402
from fedloom.runtime.federation import RoundResult  # noqa: E402
from fedloom.runtime.vectorized import VectorizedTransport  # noqa: E402


def vectorized_run(
    setup: Setup, rounds: int, between: Callable[[int], None], threads: int = 1
) -> Run:
    """FedAvg over `VectorizedTransport`, timed like `core_runtimes.fedloom_run`."""
    times: list[float] = []
    last = 0.0

    def on_round(result: RoundResult) -> None:
        nonlocal last
        times.append(time.perf_counter() - last)
        between(result.record.round)
        last = time.perf_counter()

    transport = VectorizedTransport(ClientPool(setup.trainers), threads=threads)
    settings = setup.workload.settings(rounds)
    with Federation(FedAvg(), transport, list(setup.trainers), settings, on_round=on_round) as fed:
        last = time.perf_counter()
        result = fed.run(setup.init_params)
    return Run(times, [], result.state.params)


def main() -> None:
    """Run the four runtimes and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per pass")
    parser.add_argument("--raw", action="store_true", help="also print every round's ms")
    args = parser.parse_args()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    train, test = load_mnist(str(shared if shared.is_dir() else data_dir()))
    check_floor_draws(OVERHEAD.n_clients, OVERHEAD.per_round)
    setup = build(OVERHEAD, train, test)
    rounds = args.rounds + 1  # the first round of each pass is a warm-up

    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    finals = {}
    floor_all: list[float] = []
    for key, threads in (("w1", 1), ("vec1", 1), ("vec2", 2)):
        floor = Floor(setup)
        floor_times: list[float] = []

        def step(number: int, floor: Floor = floor, out: list[float] = floor_times) -> None:
            out.append(floor.step(number))

        torch.set_num_threads(1)  # the vectorized threads run chunks, one torch thread each
        if key == "w1":
            run = fedloom_run(setup, rounds, 1, between=step)
        else:
            run = vectorized_run(setup, rounds, step, threads)
        times[key] = run.times[1:]
        ratios[key] = [a / f for a, f in zip(run.times[1:], floor_times[1:], strict=True)]
        floor_all += floor_times[1:]
        finals[key] = as_tensors(run.params)
        finals["floor"] = floor.final
    times["floor"] = floor_all

    model = new_model(OVERHEAD)
    labels = {
        "floor": "floor: plain PyTorch loop, 1 thread",
        "w1": "fedloom sequential `workers=1`, 1 thread",
        "vec1": "fedloom `vectorized=True`, 1 thread",
        "vec2": "fedloom `vectorized=True, workers=2` (2 threads)",
    }
    print("| runtime | median ms/round | IQR (ms) | speedup vs floor | test acc. |")
    print("| --- | --- | --- | --- | --- |")
    for key, label in labels.items():
        med = 1e3 * statistics.median(times[key])
        q1, _, q3 = statistics.quantiles([1e3 * t for t in times[key]], n=4)
        speedup = 1.0 if key == "floor" else 1 / statistics.median(ratios[key])
        acc = 100 * accuracy(model, finals[key], setup.test)
        print(f"| {label} | {med:.1f} | {q1:.1f}–{q3:.1f} | {speedup:.2f}x | {acc:.2f}% |")
    if args.raw:
        for key in labels:
            print(key, " ".join(f"{1e3 * t:.0f}" for t in times[key]))
    diff = max(float((finals["vec1"][k] - finals["w1"][k]).abs().max()) for k in finals["w1"])
    print(
        f"\n{args.rounds} measured rounds per pass after a warm-up round; accuracy after "
        f"{rounds} rounds on the 10,000 test images; max |vectorized - sequential| over the "
        f"final weights {diff:.1e}."
    )


if __name__ == "__main__":
    main()
