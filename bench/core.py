"""Core simulation benchmark: fedloom against a plain PyTorch FedAvg loop, side by side.

One command runs four measurements and prints markdown tables:

- `2nn` (a): MNIST 2NN (784-200-200-10), 100 clients by pathological shards (2 per client),
  10 clients per round, E=1, B=10, lr=0.1, FedAvg. Median seconds per round of (1) "floor", a
  plain PyTorch loop doing exactly the same FedAvg (same clients, same local seeds and shuffles,
  same SGD), (2) fedloom in-process (`workers=1`), (3) fedloom on two worker processes
  (`workers=2`), plus the test accuracy each reaches after the same rounds.
- `overhead` (b): 1000 IID clients of 60 examples, 100 per round, MLP 784-32-10, E=1, B=20: a
  workload where per-client framework overhead, not arithmetic, sets the pace.
- `aggregation` (c): `StreamingMean.add` on updates of McMahan's CNN size (1,663,370 float32
  parameters) in GB/s of update consumed on one thread, against `acc += w * x` in NumPy.
- `learning` (d): MNIST 2NN IID (100 clients x 600), E=1, B=10, C=0.1, lr=0.1: rounds to 97%
  centralized test accuracy, next to McMahan et al. (2017) Table 1 (87 rounds).

Every process runs single-threaded (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`). The
floor and fedloom run in the same invocation, from the same initial model and seeds, interleaved
round by round (fedloom's `on_round` hook runs the floor's same round, off fedloom's clock), and
ratios are medians of per-round ratios: this cancels the drifts of a shared machine. The first
round of every run is a warm-up and is dropped.

The runtimes themselves (the floor, the floor pair, the timed fedloom run) are in
`bench/core_runtimes.py`.

Run: `python bench/core.py [--quick] [--only 2nn|overhead|aggregation|learning]`. Without
`--quick` the results are also written into `bench/BENCHMARKS.md`.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy and torch start their thread pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core_runtimes import (  # noqa: E402
    LEARNING,
    MNIST_2NN,
    OVERHEAD,
    SEED,
    Floor,
    FloorPair,
    Setup,
    TensorDict,
    accuracy,
    as_tensors,
    build,
    check_floor_draws,
    fedloom_run,
    new_model,
)
from fedloom import Params, Update  # noqa: E402
from fedloom.core.types import Metrics  # noqa: E402
from fedloom.data import data_dir, load_mnist  # noqa: E402
from fedloom.models import mnist_cnn  # noqa: E402
from fedloom.runtime.aggregate import StreamingMean, check_update  # noqa: E402
from machine_info import cpu_model, revision  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "BENCHMARKS.md"
NAMES = ("2nn", "overhead", "aggregation", "learning")


# ------------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class Target:
    """A goal for one measured number."""

    what: str
    value: float
    goal: float
    higher_is_better: bool
    unit: str = ""

    @property
    def met(self) -> bool:
        """Whether the measurement meets the goal."""
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def line(self) -> str:
        """One markdown bullet: value, goal, met or not."""
        op = ">=" if self.higher_is_better else "<="
        verdict = "**met**" if self.met else "**NOT met**"
        return (
            f"- {self.what}: {self.value:.2f}{self.unit} (target {op} {self.goal:g}{self.unit})"
            f" — {verdict}"
        )


@dataclass
class Section:
    """The printed and recorded result of one benchmark."""

    name: str
    title: str
    table: list[list[str]]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """Title, table, notes and target verdicts."""
        head, *rows = self.table
        lines = [f"#### {self.title}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join(" --- " for _ in head) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
        for note in self.notes:
            lines += [note, ""]
        lines += [t.line() for t in self.targets]
        return "\n".join(lines).rstrip() + "\n"


def machine() -> str:
    """CPU model (from `lscpu`), core count, and the Python / torch / NumPy versions."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, NumPy {np.__version__}"
    )


def median_ms(values: Sequence[float]) -> str:
    """Median of seconds, printed in milliseconds."""
    return f"{1e3 * statistics.median(values):.1f}"


def spread_ms(values: Sequence[float]) -> str:
    """Interquartile range of seconds, in milliseconds."""
    q = np.percentile(values, [25, 75]) * 1e3
    return f"{q[0]:.1f}–{q[1]:.1f}"


def max_abs_diff(a: TensorDict, b: TensorDict) -> float:
    """Largest element-wise difference between two models."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------- (a), (b): seconds/round


RUNTIMES = {
    "floor": "floor: plain PyTorch loop, 1 thread",
    "pair": "floor, two copies at once (time per copy)",
    "w1": "fedloom `workers=1`, 1 thread",
    "w2": "fedloom `workers=2` (2 worker processes)",
}


def compare_rounds(setup: Setup, title: str, name: str, rounds: int, single_goal: float) -> Section:
    """Floor, two floors at once, fedloom workers=1 and workers=2, round by round.

    Two passes of `rounds` + 1 rounds (the first is a warm-up and dropped). Pass 1: fedloom
    `workers=1` runs a round, then the floor runs the same round. Pass 2: fedloom `workers=2`,
    then the floor, then the floor pair. Each ratio is the median of per-round ratios, so the
    machine's drifts (this VM varies by +-15% from second to second) cancel.
    """
    w = setup.workload
    t: dict[str, list[float]] = {k: [] for k in RUNTIMES}
    ratios: dict[str, list[float]] = {k: [] for k in RUNTIMES}
    finals: dict[str, TensorDict] = {}

    floor = Floor(setup)
    floor_times: list[float] = []
    run1 = fedloom_run(setup, rounds + 1, 1, between=lambda r: floor_times.append(floor.step(r)))
    t["w1"], t["floor"] = run1.times[1:], floor_times[1:]
    ratios["w1"] = [a / f for a, f in zip(t["w1"], t["floor"], strict=True)]
    finals["floor"], finals["w1"] = floor.final, as_tensors(run1.params)

    floor, pair = Floor(setup), FloorPair(setup)
    floor_times, pair_times = [], []

    def others(number: int) -> None:
        floor_times.append(floor.step(number))
        pair_times.append(statistics.mean(pair.step(number)))

    try:
        run2 = fedloom_run(setup, rounds + 1, 2, between=others)
    finally:
        pair.close()
    t["w2"], t["pair"] = run2.times[1:], pair_times[1:]
    t["floor"] += floor_times[1:]
    ratios["w2"] = [a / f for a, f in zip(t["w2"], floor_times[1:], strict=True)]
    ratios["pair"] = [a / f for a, f in zip(t["pair"], floor_times[1:], strict=True)]
    ratios["floor"] = [1.0]
    finals["w2"] = as_tensors(run2.params)

    eval_model = new_model(w)
    acc = {k: accuracy(eval_model, v, setup.test) for k, v in finals.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    table = [["runtime", "median ms/round", "IQR (ms)", "time vs floor", "test acc."]]
    for key, label in RUNTIMES.items():
        table.append(
            [
                label,
                median_ms(t[key]),
                spread_ms(t[key]),
                f"{ratio[key]:.2f}x",
                f"{100 * acc[key]:.2f}%" if key in acc else "",
            ]
        )
    pass1 = zip(t["w1"], t["floor"][:rounds], strict=True)
    overhead_us = 1e6 * statistics.median(a - f for a, f in pass1) / w.per_round
    ceiling, speedup = 2 / ratio["pair"], 1 / ratio["w2"]
    busy = statistics.median(
        c / (2 * r) for c, r in zip(run2.client_seconds[1:], run2.times[1:], strict=True)
    )
    client_ms = {
        k: 1e3 * statistics.median(run.client_seconds[1:]) / w.per_round
        for k, run in ((1, run1), (2, run2))
    }
    notes = [
        f"{w.n_clients} clients ({w.split}), {w.per_round} per round, MLP 784-"
        + "-".join(map(str, w.hidden))
        + f"-10, E={w.epochs}, B={w.batch}, lr={w.lr}. {rounds} measured rounds per runtime "
        f'after one warm-up round, interleaved round by round; "time vs floor" is the median'
        f" of per-round ratios. Test accuracy on the 10,000 MNIST test images after "
        f"{rounds + 1} rounds.",
        f"Same workload: max |floor - fedloom| over the final weights "
        f"{max_abs_diff(finals['floor'], finals['w1']):.1e} (float rounding, which SGD "
        f"amplifies over rounds: the floor averages models, fedloom adds the mean delta); "
        f"workers=1 vs workers=2 "
        f"{max_abs_diff(finals['w1'], finals['w2']):.1e}. fedloom's single-threaded overhead "
        f"is {overhead_us:.0f} us per client.",
        f"Two processes can at best be {ceiling:.2f}x as fast as the floor on this machine "
        f"(2 / the pair's time ratio); fedloom `workers=2` is {speedup:.2f}x, "
        f"{100 * speedup / ceiling:.0f}% of that ceiling. The two workers spend "
        f"{100 * busy:.0f}% of each round training clients (the rest: messages, aggregation, "
        f"the round barrier); one client's training takes {client_ms[2]:.1f} ms there against "
        f"{client_ms[1]:.1f} ms with `workers=1` (the hardware's slowdown).",
    ]
    targets = [Target("fedloom workers=1 / floor", ratio["w1"], single_goal, False, "x")]
    if name == "2nn":
        targets.append(Target("floor / fedloom workers=2 (speedup)", speedup, 1.6, True, "x"))
    return Section(name, title, table, targets, notes)


# ----------------------------------------------------------------------- (c) aggregation


def bench_aggregation(reps: int, distinct: int = 16) -> Section:
    """`StreamingMean.add` on CNN-sized updates vs NumPy `acc += w * x`, single thread.

    Updates cycle over `distinct` different buffers (16 x 6.65 MB, more than the L3 cache) so
    every add reads its update from memory, as an aggregator does for updates that arrive.
    """
    shapes = {k: tuple(v.shape) for k, v in mnist_cnn().state_dict().items()}
    rng = np.random.default_rng(SEED)
    template = Params.from_arrays({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()})
    layout = template.layout
    deltas = [
        template.with_flat(rng.standard_normal(layout.size, dtype=np.float32))
        for _ in range(distinct)
    ]
    updates = [Update(d, 600 + i) for i, d in enumerate(deltas)]
    nbytes = deltas[0].nbytes

    def fedloom_add() -> None:
        mean = StreamingMean(layout)
        for u in updates:
            mean.add(u)

    def fedloom_checked() -> None:
        mean = StreamingMean(layout)
        for u in updates:
            assert check_update(u, layout, {}) is None
            mean.add(u)

    acc = np.zeros(layout.size, dtype=np.float32)

    def numpy_floor() -> None:
        acc[:] = 0
        for u in updates:
            acc.__iadd__(np.float32(u.num_examples) * u.delta.flat)

    acc_t = torch.from_numpy(acc)
    flats_t = [torch.from_numpy(d.flat) for d in deltas]

    def torch_fused() -> None:
        acc_t.zero_()
        for u, x in zip(updates, flats_t, strict=True):
            acc_t.add_(x, alpha=u.num_examples)

    cases = {
        "NumPy floor: `acc += w * x`": numpy_floor,
        "torch `acc.add_(x, alpha=w)` (one fused pass)": torch_fused,
        "fedloom `StreamingMean.add`": fedloom_add,
        "fedloom `check_update` + `add` (what a round does)": fedloom_checked,
    }
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleaved
        for label, fn in cases.items():
            start = time.perf_counter()
            fn()
            seconds[label].append((time.perf_counter() - start) / distinct)
    table = [["operation (1 thread, 1,663,370 float32 = 6.65 MB per update)", "ms/update", "GB/s"]]
    rate: dict[str, float] = {}
    for label, values in seconds.items():
        per = statistics.median(values)
        rate[label] = nbytes / per / 1e9
        table.append([label, f"{1e3 * per:.2f}", f"{rate[label]:.2f}"])
    notes = [
        f"GB/s = bytes of update delta consumed per second; median of {reps} passes over "
        f"{distinct} distinct updates (cycled, so each is read from memory, not cache)."
    ]
    targets = [
        Target(
            "`StreamingMean.add` throughput",
            rate["fedloom `StreamingMean.add`"],
            2.0,
            True,
            " GB/s",
        )
    ]
    return Section("aggregation", "(c) Aggregation throughput", table, targets, notes)


# --------------------------------------------------------------------------- (d) learning


def bench_learning(setup: Setup, cap: int) -> Section:
    """Rounds to 97% test accuracy, with workers=2 and then workers=1 (same run, timed)."""
    eval_model = new_model(setup.workload)

    def evaluate(params: Params) -> Metrics:
        return {"accuracy": accuracy(eval_model, as_tensors(params), setup.test)}

    table = [["", "rounds to 97%", "final acc.", "wall time (s)", "s/round"]]
    table.append(["McMahan et al. 2017, Table 1 (2NN, IID, B=10, C=0.1)", "87", "", "", ""])
    found: dict[int, int] = {}
    for workers in (2, 1):
        start = time.perf_counter()
        run = fedloom_run(setup, cap, workers, evaluate, target_accuracy=0.97)
        rounds = len(run.times)
        wall = time.perf_counter() - start
        final = evaluate(run.params)["accuracy"]
        reached = final >= 0.97
        found[workers] = rounds
        table.append(
            [
                f"fedloom `workers={workers}`",
                str(rounds) if reached else f"not reached in {cap}",
                f"{100 * final:.2f}%",
                f"{wall:.1f}",
                f"{statistics.median(run.times):.3f}",
            ]
        )
    w = setup.workload
    notes = [
        f"{w.n_clients} IID clients x 600, MLP 784-200-200-10, E={w.epochs}, B={w.batch}, "
        f"C={w.per_round / w.n_clients:g}, FedAvg lr={w.lr} (not tuned; McMahan et al. tuned "
        f"the learning rate per setting), seed {SEED}; centralized test accuracy after every "
        f"round (included in the time); stops at 97% (cap {cap} rounds).",
        "Both runtimes give bit-identical runs, so the round counts agree: "
        + ("yes." if found[1] == found[2] else f"NO ({found[1]} vs {found[2]})."),
    ]
    return Section("learning", "(d) Learning: rounds to 97% on MNIST 2NN IID", table, [], notes)


# ------------------------------------------------------------------------- BENCHMARKS.md


def record(sections: Sequence[Section], command: str, path: Path = RESULTS) -> None:
    """Rewrite each section's marked block in `path`, keeping everything else.

    The file gets a "Core simulation (issue 2)" chapter with one marked block per benchmark
    (appended if missing), so `--only` updates one block and leaves the others as they were.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if "## Core simulation (issue 2)" not in text:
        text = text.rstrip() + "\n\n## Core simulation (issue 2)\n\n"
        text += "".join(f"<!-- core:{n}:begin -->\n<!-- core:{n}:end -->\n\n" for n in NAMES)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for s in sections:
        begin, end = f"<!-- core:{s.name}:begin -->", f"<!-- core:{s.name}:end -->"
        body = (
            f"{begin}\n{s.markdown()}\n"
            f"_Measured {stamp} on {machine()}; fedloom at commit {revision()}; "
            f"command `{command}`._\n{end}"
        )
        found = re.search(re.escape(begin) + r".*?" + re.escape(end), text, re.DOTALL)
        if found is None:
            text = text.rstrip() + "\n\n" + body + "\n"
        else:
            text = text[: found.start()] + body + text[found.end() :]
    path.write_text(text)


# ---------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the selected benchmarks, print and record the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; skips learning")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only this (repeatable)")
    parser.add_argument("--data", default=None, help="data root (default $FEDLOOM_DATA)")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record results in bench/BENCHMARKS.md (default: yes unless --quick)",
    )
    args = parser.parse_args(argv)
    chosen = args.only or [n for n in NAMES if not (args.quick and n == "learning")]
    write = args.write if args.write is not None else not args.quick
    command = shlex.join(["python", "bench/core.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(1)
    root = args.data or os.environ.get("FEDLOOM_DATA") or _default_data_root()
    train, test = load_mnist(root)
    print(f"{machine()}\n{command}\n", flush=True)

    sections: list[Section] = []
    for name in chosen:
        start = time.perf_counter()
        if name == "2nn":
            check_floor_draws(MNIST_2NN.n_clients, MNIST_2NN.per_round)
            title = "(a) MNIST 2NN, pathological non-IID: seconds per round"
            setup = build(MNIST_2NN, train, test)
            sections.append(compare_rounds(setup, title, name, 3 if args.quick else 30, 1.15))
        elif name == "overhead":
            check_floor_draws(OVERHEAD.n_clients, OVERHEAD.per_round)
            title = "(b) Overhead-bound: 1000 clients x 60 examples, MLP 784-32-10"
            setup = build(OVERHEAD, train, test)
            sections.append(compare_rounds(setup, title, name, 3 if args.quick else 40, 1.3))
        elif name == "aggregation":
            sections.append(bench_aggregation(reps=5 if args.quick else 30))
        else:
            sections.append(
                bench_learning(build(LEARNING, train, test), cap=40 if args.quick else 200)
            )
        print(sections[-1].markdown(), flush=True)
        print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    if write:
        record(sections, command)
        print(f"recorded in {RESULTS}")


def _default_data_root() -> str:
    """`../shared/data` next to the repository when present, else fedloom's default."""
    shared = BENCH_DIR.parent.parent / "shared" / "data"
    return str(shared if shared.is_dir() else data_dir())


if __name__ == "__main__":
    main()
