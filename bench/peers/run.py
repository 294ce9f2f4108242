"""Peers benchmark (issue 3): fedloom against Flower's simulation runtime, side by side.

One command runs up to three workloads, each on four runtimes, every runtime in its own
subprocess so that whole-process wall time (start-up included) and peak memory are fair:

- floor: the plain PyTorch FedAvg loop of `bench/core_runtimes.py` (`Floor`), one thread;
- fedloom `workers=1` and `workers=2`: `Federation.simulation(FedAvg(), trainers, settings)`
  through `fedloom_run` of `bench/core_runtimes.py`;
- Flower 1.42 simulation: `bench/peers/flower_sim.py` (ServerApp + ClientApp +
  `flwr.simulation.run_simulation`, Ray backend, one CPU per client, so two clients train at
  once), run with the Python of `bench/.venv-flower` (`bench/peers/setup.sh` makes it).

Workloads (lr 0.1, seed 0, FedAvg, same client draws and local shuffling seeds everywhere):

- `a`: MNIST 2NN (784-200-200-10), 100 clients by pathological shards, 10 per round, E=1, B=10;
- `b`: overhead-bound: 1000 IID clients x 60 examples, 100 per round, MLP 784-32-10, E=1, B=20;
- `c`: cross-device scale: 10,000 IID clients x 6 examples, 1,000 per round, logistic
  regression (784-10 linear), E=1, B=10 (one step per client).

Measured per runtime: median seconds per round (server side, first round dropped as warm-up),
whole-process wall seconds from `Popen` to exit (interpreter start, imports, data loading and
partitioning, runtime start-up, rounds, final evaluation, shutdown), peak memory, and test
accuracy of the final model. Peak memory is polled by this driver every 0.2 s over the whole
process tree of the child (`/proc/*/stat` parent links, so Ray's raylet, GCS and worker
processes count): the peak of the tree's summed PSS (proportional set size: pages shared
between processes, like fedloom's forked workers' copy-on-write pages, are split between them
rather than counted once per process) and of its summed RSS. `ru_maxrss` from `os.wait4`
(largest single process among the child and its reaped descendants) is reported too.

Run under an exclusive lock, so that other jobs on the machine do not skew the timings:

    flock /tmp/fedloom-bench.lock python bench/peers/run.py [--quick] [--only a|b|c]

Without `--quick` the tables are also written into bench/BENCHMARKS.md (peers section).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy and torch start their thread pools

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent
BENCH_DIR = PEERS_DIR.parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # bench/core_runtimes.py, bench/core.py

import torch  # noqa: E402

from core import compare_rounds, machine, revision  # noqa: E402
from core_runtimes import (  # noqa: E402
    MNIST_2NN,
    OVERHEAD,
    SEED,
    Floor,
    Setup,
    Workload,
    accuracy,
    as_tensors,
    build,
    check_floor_draws,
    draw_clients,
    fedloom_run,
    local_seed,
    new_model,
)
from fedloom.data import ArrayDataset, data_dir, iid, load_mnist, shards  # noqa: E402

RESULTS = BENCH_DIR / "BENCHMARKS.md"
PREP = BENCH_DIR / "results" / "peers"
FLOWER_PY = BENCH_DIR / ".venv-flower" / "bin" / "python"

#: Workload (c): logistic regression is an MLP without hidden layers.
CROSS_DEVICE = Workload((), "iid", 10_000, 1_000, batch=10, lr=0.1)
WORKLOADS = {"a": MNIST_2NN, "b": OVERHEAD, "c": CROSS_DEVICE}
TITLES = {
    "a": "(a) MNIST 2NN, 100 clients by pathological shards, 10 per round",
    "b": "(b) Overhead-bound: 1000 clients x 60 examples, 100 per round, MLP 784-32-10",
    "c": "(c) Cross-device scale: 10,000 clients x 6 examples, 1,000 per round, logistic reg.",
}
ROUNDS = {"a": 20, "b": 10, "c": 5}  # (c): Flower needs ~40 s per round here
RUNTIMES = {
    "floor": "floor: plain PyTorch loop, 1 thread",
    "fedloom1": "fedloom `workers=1`",
    "fedloom2": "fedloom `workers=2`",
    "flower": "Flower 1.42 simulation (Ray, 2 clients at once)",
}


# -------------------------------------------------------------------- children: one runtime


def data_root() -> str:
    """`$FEDLOOM_DATA`, else `shared/data` beside the repository, else fedloom's default."""
    shared = REPO.parent / "shared" / "data"
    return os.environ.get("FEDLOOM_DATA") or str(shared if shared.is_dir() else data_dir())


def floor_setup(w: Workload, train: ArrayDataset, test: ArrayDataset) -> Setup:
    """What `Floor` needs (`build` without the fedloom trainers): same partition, same init."""
    parts = (
        shards(train.y, w.n_clients, SEED)
        if w.split == "shards"
        else iid(len(train), w.n_clients, SEED)
    )
    clients = [(torch.from_numpy(train.x[p]), torch.from_numpy(train.y[p])) for p in parts]
    torch.manual_seed(SEED)
    init = {k: v.detach().clone() for k, v in new_model(w).state_dict().items()}
    return Setup(w, clients, {}, init, (torch.from_numpy(test.x), torch.from_numpy(test.y)))


def child(runtime: str, workload: str, rounds: int, out: Path) -> None:
    """Run one runtime on one workload in this process; write its results to `out`."""
    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    train, test = load_mnist(data_root())
    if runtime == "floor":
        setup = floor_setup(w, train, test)
        floor = Floor(setup)
        times = [floor.step(r) for r in range(1, rounds + 1)]
        final = floor.final
    else:
        setup = build(w, train, test)
        run = fedloom_run(setup, rounds, 1 if runtime == "fedloom1" else 2)
        times, final = run.times, as_tensors(run.params)
    acc = accuracy(new_model(w), final, setup.test)
    out.write_text(json.dumps({"round_seconds": times, "accuracy": acc}))


# ----------------------------------------------------------------- Flower: prepared inputs


def prepare(name: str, rounds: int) -> Path:
    """Write what flower_sim.py needs (it has no fedloom): data, partition, init, draws."""
    w = WORKLOADS[name]
    PREP.mkdir(parents=True, exist_ok=True)
    train, test = load_mnist(data_root())
    for part, arr in (
        ("train_x", train.x),
        ("train_y", train.y),
        ("test_x", test.x),
        ("test_y", test.y),
    ):
        path = PREP / f"{part}.npy"
        if not path.exists() or np.load(path, mmap_mode="r").shape != arr.shape:
            np.save(path, arr)
    setup = floor_setup(w, train, test)
    parts = (
        shards(train.y, w.n_clients, SEED)
        if w.split == "shards"
        else iid(len(train), w.n_clients, SEED)
    )
    draws = np.array([draw_clients(r, w.n_clients, w.per_round) for r in range(1, rounds + 1)])
    seeds = np.array([[local_seed(r, int(k)) for k in row] for r, row in enumerate(draws, 1)])
    names = list(setup.init)
    np.savez(
        PREP / f"{name}.npz",
        index=np.concatenate(parts),
        offsets=np.cumsum([0] + [len(p) for p in parts]),
        draws=draws,
        seeds=seeds,
        names=np.array(names),
        **{f"init_{i}": setup.init[k].numpy() for i, k in enumerate(names)},
    )
    meta = {"hidden": list(w.hidden), "batch": w.batch, "lr": w.lr, "epochs": w.epochs}
    meta |= {"n_clients": w.n_clients, "per_round": w.per_round}
    (PREP / f"{name}.json").write_text(json.dumps(meta))
    return PREP


# ------------------------------------------------------------------- driver: measurement


@dataclass
class Measured:
    """One runtime's run of one workload, as seen from outside and reported from inside."""

    runtime: str
    wall: float
    peak_pss_mb: float
    peak_rss_mb: float
    maxrss_mb: float
    round_seconds: list[float]
    accuracy: float | None
    note: str = ""

    @property
    def median_round(self) -> float | None:
        """Median seconds per round, the first (warm-up) round dropped when there are more."""
        times = self.round_seconds[1:] if len(self.round_seconds) > 1 else self.round_seconds
        return statistics.median(times) if times else None


def _tree(root: int) -> list[int]:
    """`root` and all its live descendants, from the parent links in `/proc/*/stat`."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    kids: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += kids.get(pid, [])
    return found


def _memory(pids: Sequence[int]) -> tuple[int, int]:
    """Summed (PSS, RSS) in kB of `pids`, from `/proc/PID/smaps_rollup`."""
    pss = rss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
    return pss, rss


def measure(runtime: str, cmd: list[str], out: Path, timeout: float, log: Path) -> Measured:
    """Run `cmd` as a subprocess; time it, poll its process tree's memory, read `out`."""
    peak = [0, 0]
    done = threading.Event()
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)

        def poll() -> None:
            while not done.wait(0.2):
                pss, rss = _memory(_tree(proc.pid))
                peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        note = ""
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                _kill_tree(proc.pid)
                pid, status, usage = os.wait4(proc.pid, 0)
                note = f"stopped after {timeout:.0f} s"
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        poller.join()
    result: dict[str, object] = {}
    if out.exists():
        result = json.loads(out.read_text())
    elif not note:
        note = f"failed (exit {proc.returncode}); log in {log}"
    if not result and note.startswith("stopped"):
        rounds = re.findall(r"PEERS-ROUND \d+ ([0-9.]+)", log.read_text())
        result = {"round_seconds": [float(s) for s in rounds], "accuracy": None}
        note += f", {len(rounds)} rounds done"
    times = result.get("round_seconds", [])
    acc = result.get("accuracy")
    return Measured(
        runtime,
        wall,
        peak[0] / 1024,
        peak[1] / 1024,
        usage.ru_maxrss / 1024,
        [float(t) for t in times] if isinstance(times, list) else [],
        float(acc) if isinstance(acc, float) else None,
        note,
    )


def _kill_tree(root: int) -> None:
    """SIGKILL `root`'s descendants, then `root` (all started by this driver)."""
    for pid in reversed(_tree(root)):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


# --------------------------------------------------------------------------- reporting


def interleaved(name: str, rounds: int) -> tuple[str, float]:
    """`bench/core.py`'s comparison of the floor and fedloom, interleaved round by round.

    Runs in this (driver) process: fedloom `workers=1` with the floor's same round run in its
    `on_round` hook, then `workers=2` with the floor and the floor pair. Returns the markdown
    (table and notes) and fedloom's single-threaded overhead in microseconds per client.
    """
    torch.set_num_threads(1)
    train, test = load_mnist(data_root())
    section = compare_rounds(build(WORKLOADS[name], train, test), "", name, rounds, 1.3)
    section.title = (
        f"({name}) floor and fedloom interleaved round by round "
        "(`compare_rounds` of `bench/core.py`, in the driver process)"
    )
    section.targets = []
    found = re.search(r"overhead is (-?\d+) us per client", " ".join(section.notes))
    return section.markdown(), float(found.group(1)) if found else float("nan")


def run_workload(
    name: str,
    rounds: int,
    flower_timeout: float,
    runtimes: Sequence[str],
    interleaved_rounds: int = 0,
) -> str:
    """Measure every runtime on one workload; return its markdown block.

    With `interleaved_rounds`, workload (c) also gets `interleaved`'s per-client overhead,
    the precise one (the subprocess runs are minutes apart and carry the machine's drift).
    """
    w = WORKLOADS[name]
    check_floor_draws(w.n_clients, w.per_round)
    tmp = Path(tempfile.mkdtemp(prefix=f"peers-{name}-"))
    results: dict[str, Measured] = {}
    for rt in runtimes:
        out, log = tmp / f"{rt}.json", tmp / f"{rt}.log"
        if rt == "flower":
            if not FLOWER_PY.exists():
                print("  flower: skipped, run bench/peers/setup.sh first", flush=True)
                continue
            prep = prepare(name, rounds)
            cmd = [str(FLOWER_PY), str(PEERS_DIR / "flower_sim.py"), str(prep), name, str(out)]
            timeout = flower_timeout
        else:
            cmd = [sys.executable, __file__, "--child", rt, "--only", name]
            cmd += ["--rounds", str(rounds), "--out", str(out)]
            timeout = 600.0
        m = measure(rt, cmd, out, timeout, log)
        results[rt] = m
        print(
            f"  {rt}: wall {m.wall:.1f} s, median round {m.median_round}, "
            f"PSS {m.peak_pss_mb:.0f} MB, acc {m.accuracy} {m.note}",
            flush=True,
        )
    extra, overhead_us = "", None
    if interleaved_rounds and name == "c":
        extra, overhead_us = interleaved(name, interleaved_rounds)
    block = markdown(name, rounds, results, overhead_us)
    return block + ("\n" + extra.replace("#### ", "##### ") if extra else "")


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or a dash when there is none."""
    return "—" if value is None else format(value, spec)


def markdown(
    name: str, rounds: int, r: dict[str, Measured], overhead_us: float | None = None
) -> str:
    """Table, workload line, and the target verdicts of one workload."""
    w = WORKLOADS[name]
    lines = [f"#### {TITLES[name]}", ""]
    lines.append(
        "| runtime | median s/round | whole process (s) | peak PSS, tree (MB) "
        "| peak RSS, tree (MB) | largest process RSS (MB) | test acc. |"
    )
    lines.append("|" + " --- |" * 7)
    for key, m in r.items():
        acc = "—" if m.accuracy is None else f"{100 * m.accuracy:.2f}%"
        label = RUNTIMES[key] + (f" ({m.note})" if m.note else "")
        lines.append(
            f"| {label} | {_fmt(m.median_round, '.4f')} | {m.wall:.1f} | {m.peak_pss_mb:.0f} "
            f"| {m.peak_rss_mb:.0f} | {m.maxrss_mb:.0f} | {acc} |"
        )
    lines += [
        "",
        f"{w.n_clients} clients ({w.split}), {w.per_round} per round, model 784-"
        + "".join(f"{h}-" for h in w.hidden)
        + f"10, E={w.epochs}, B={w.batch}, lr={w.lr}, seed {SEED}; {rounds} rounds, the "
        "first dropped from the median. Accuracy on the 10,000 MNIST test images.",
        "",
    ]
    lines += targets(name, r, overhead_us)
    return "\n".join(lines).rstrip() + "\n"


def targets(name: str, r: dict[str, Measured], overhead_us: float | None = None) -> list[str]:
    """One line per issue-3 target of this workload: value, met or not.

    (c)'s per-client overhead is `overhead_us` (interleaved) when given, else the difference
    of the separate runs' median rounds.
    """

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**NOT met**"

    out: list[str] = []
    fl, f1, f2 = r.get("flower"), r.get("fedloom1"), r.get("fedloom2")
    if name == "a" and fl and f2 and f1:
        ratio = fl.wall / f2.wall
        out.append(
            f"- (a) Flower / fedloom `workers=2`, whole process: {ratio:.1f}x "
            f"(`workers=1`: {fl.wall / f1.wall:.1f}x) (target >= 2x) — {verdict(ratio >= 2)}"
        )
    if name == "b" and fl and f2 and f1 and fl.median_round and f2.median_round:
        ratio = fl.median_round / f2.median_round
        alt = fl.median_round / f1.median_round if f1.median_round else float("nan")
        out.append(
            f"- (b) Flower / fedloom `workers=2`, median per round: {ratio:.1f}x "
            f"(`workers=1`: {alt:.1f}x) (target >= 10x) — {verdict(ratio >= 10)}"
        )
    if name == "c" and f1 and f2:
        peak = max(f1.peak_pss_mb, f2.peak_pss_mb)
        out.append(
            f"- (c) fedloom peak memory (process tree PSS, the larger of `workers=1` and "
            f"`workers=2`): {peak:.0f} MB (target < 2048 MB) — {verdict(peak < 2048)}"
        )
        fo = r.get("floor")
        per = WORKLOADS[name].per_round
        parts = []
        if overhead_us is not None:
            parts.append(f"{overhead_us:.0f} us interleaved round by round (table below)")
        if fo and fo.median_round and f1.median_round:
            us = 1e6 * (f1.median_round - fo.median_round) / per
            parts.append(f"{us:.0f} us from the separate runs' median rounds")
            overhead_us = us if overhead_us is None else overhead_us
        if overhead_us is not None:
            out.append(
                f"- (c) fedloom `workers=1` per-client overhead beyond training "
                f"((fedloom round - floor round) / {per}): {'; '.join(parts)} "
                f"(target < 100 us) — {verdict(overhead_us < 100)}"
            )
    return out


def record(blocks: dict[str, str], command: str, path: Path = RESULTS) -> None:
    """Rewrite each workload's `<!-- peers:NAME:begin/end -->` block inside the peers section."""
    text = path.read_text()
    if "<!-- peers:begin -->" not in text:
        text = text.rstrip() + "\n\n<!-- peers:begin -->\n<!-- peers:end -->\n"
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for name, block in blocks.items():
        begin, end = f"<!-- peers:{name}:begin -->", f"<!-- peers:{name}:end -->"
        body = (
            f"{begin}\n{block}\n_Measured {stamp} on {machine()}; fedloom at commit "
            f"{revision()}; command `{command}`._\n{end}"
        )
        found = re.search(re.escape(begin) + r".*?" + re.escape(end), text, re.DOTALL)
        if found is None:
            at = text.index("<!-- peers:end -->")
            text = text[:at] + body + "\n\n" + text[at:]
        else:
            text = text[: found.start()] + body + text[found.end() :]
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line; run one child, or drive the selected workloads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, records nothing")
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append", help="workload")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default per workload)")
    parser.add_argument("--flower-timeout", type=float, default=420.0, help="seconds, per run")
    parser.add_argument(
        "--interleaved-rounds",
        type=int,
        default=None,
        help="(c): rounds of the interleaved floor/fedloom comparison (default 20; 0: none)",
    )
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--child", choices=["floor", "fedloom1", "fedloom2"], help=argparse.SUPPRESS
    )
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.only[0], args.rounds, args.out)
        return
    chosen = args.only or sorted(WORKLOADS)
    write = args.write if args.write is not None else not args.quick
    runtimes = [rt for rt in args.runtimes.split(",") if rt]
    command = shlex.join(
        ["python", "bench/peers/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"{machine()}\n{command}\n", flush=True)
    blocks: dict[str, str] = {}
    for name in chosen:
        rounds = args.rounds or (3 if args.quick else ROUNDS[name])
        start = time.perf_counter()
        print(f"workload {name}, {rounds} rounds", flush=True)
        inter = args.interleaved_rounds
        inter = (3 if args.quick else 20) if inter is None else inter
        blocks[name] = run_workload(name, rounds, args.flower_timeout, runtimes, inter)
        print(blocks[name], flush=True)
        print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    if write:
        record(blocks, f"flock /tmp/fedloom-bench.lock {command}")
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
