"""Deployment benchmark (issue 4): fedloom over gRPC against Flower 1.42's deployment runtime,
side by side in one run, with the loopback and compute floors.

On 127.0.0.1 only, with the same prepared inputs (MNIST shards from fedloom's loader and IID
partition, initial weights of `fedloom.models.mnist_cnn`), in this order:

1. compute floor: a plain PyTorch loop, one process, one thread (`floor.compute`);
2. loopback floors: one round's raw float32 bytes moved between the driver and `clients`
   receiver processes, plain TCP and mutual TLS (`floor.loopback`);
3. fedloom: a `GrpcTransport` server (mutual TLS, per-client test certificates) running
   `Federation` + FedAvg, and `clients` processes running `run_participant` with a
   `TorchTrainer` (`fedloom_side.run_fedloom`);
4. Flower 1.42: flower-superlink, `clients` flower-supernodes, `flwr run` of
   `bench/deploy/flower_app` (`flower_side.run_flower`), TLS with the same server certificate.

Every step runs its processes itself and stops them all (process sessions, SIGTERM then
SIGKILL) before the next starts, so no two steps share the cores. Run it under the benchmark
lock, and set up Flower's environment once (`bash bench/peers/setup.sh`):

    flock /tmp/fedloom-bench.lock python bench/deploy/run.py

Without `--no-write` the table and verdicts go into bench/BENCHMARKS.md, section
"Deployment (issue 4)"; the raw numbers into bench/results/deploy/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # bench/: machine_info

import floor
from common import RESULTS_DIR, Interference, Workload, prepare, wait_quiet
from fedloom_side import run_fedloom, write_pki
from flower_side import run_flower
from report import Row, cpu_summary, render, timed, write_benchmarks

from machine_info import cpu_model, revision

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    """CPU model, core count, memory, and the Python / torch / grpcio / flwr versions."""
    import os
    import platform
    from importlib.metadata import version

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"a {os.cpu_count()}-vCPU VM ({cpu_model()}), {mem:.0f} GiB, no GPU; Python "
        f"{platform.python_version()}, torch {version('torch')}, grpcio {version('grpcio')}, "
        f"flwr 1.42.0 (bench/.venv-flower)"
    )


def max_abs_diff(a: str, b: str) -> float:
    """Largest absolute difference between two `.npz` files of the same named arrays."""
    import numpy as np

    with np.load(a) as x, np.load(b) as y:
        if set(x.files) != set(y.files):
            raise ValueError(f"different tensors: {sorted(x.files)} vs {sorted(y.files)}")
        return max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files)


def measure(
    w: Workload,
    only: set[str],
    tls_flower: bool,
    timeout: float,
    quiet_wait: float,
    profile: bool = False,
    unsigned: bool = False,
) -> dict[str, Any]:
    """Run the selected parts; return the rows of the table and the raw numbers.

    Before each step it waits (up to `quiet_wait` seconds) for other processes on the machine
    to go quiet, and while the step runs it measures the CPU they use anyway (`Interference`):
    both go into the results, so a run disturbed by other jobs says so."""
    work = RESULTS_DIR
    prep, certs = work / "prep", work / "certs"
    meta = prepare(prep, w)
    write_pki(certs, w)
    rows: dict[str, Row] = {}
    raw: dict[str, Any] = {"workload": w.as_dict(), **meta, "others": {}}
    mb = meta["model_bytes"]
    n = w.total_rounds

    def step(key: str, title: str, run: Callable[[], Any]) -> Any:
        print(f"{title} ...", flush=True)
        before = wait_quiet(quiet_wait)
        with Interference() as during:
            result = run()
        raw["others"][key] = {"before": before, "during": during.cores}
        raw[key] = result
        return result

    step("compute", "compute floor", lambda: floor.compute(prep, n, work, timeout))
    for key, tls in (("tcp", None), ("tls", certs)):
        step(
            key,
            f"loopback floor, {key.upper()}",
            partial(floor.loopback, w.clients, mb, mb, n, w.warmup, work, tls),
        )
    rows["compute"] = Row(
        "compute floor: plain PyTorch, 1 process, 1 thread", timed(raw["compute"], w)
    )
    for key, what in (("tcp", "plain TCP"), ("tls", "mutual TLS")):
        seconds = timed(raw[key]["round_seconds"], w)
        rows[key] = Row(f"loopback floor: round's bytes, {what}", seconds)
    if "fedloom" in only:
        f = step(
            "fedloom",
            "fedloom",
            lambda: run_fedloom(w, prep, certs, work, timeout, profile, unsigned),
        )
        rows["fedloom"] = Row(
            "fedloom gRPC (mutual TLS" + (", unsigned replies)" if unsigned else ")"),
            timed([r["seconds"] for r in f["rounds"]], w),
            timed([max(r["client_seconds"]) for r in f["rounds"]], w),
        )
        raw["fedloom_bytes"] = f["rounds"][-1]["bytes_down"] + f["rounds"][-1]["bytes_up"]
        t = step(
            "fedloom_transport",
            "fedloom, training switched off",
            lambda: run_fedloom(w, prep, certs, work, timeout, profile, unsigned, train=False),
        )
        rows["fedloom_transport"] = Row(
            "fedloom gRPC, training switched off (the transport alone)",
            timed([r["seconds"] for r in t["rounds"]], w),
        )
    if "flower" in only:
        fl = step(
            "flower", "Flower", lambda: run_flower(w, prep, certs, work, timeout, tls=tls_flower)
        )
        rows["flower"] = Row(
            f"Flower 1.42 deployment ({'TLS' if tls_flower else 'insecure, no TLS'})",
            timed(fl["round_seconds"], w),
            timed([max(c) for c in fl["client_seconds"]], w),
        )
    for key, row in rows.items():
        rows[key] = replace(row, others=raw["others"][key]["during"])
    if "fedloom" in raw and "flower" in raw:
        raw["same_weights"] = max_abs_diff(raw["fedloom"]["final"], raw["flower"]["final"])
    return {"rows": rows, "raw": raw}


def main() -> None:
    """Parse the options, measure, print the table, and record it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    # 10: freshly started processes fault in fresh memory for their first rounds (measured on
    # the fedloom side: 150,000 page faults in round 2 across the clients, 45,000 in round 8,
    # 15,000 from round 10 on) and those rounds run 1.2-2x slower; steady state comes after.
    p.add_argument("--warmup", type=int, default=10, help="rounds run and dropped first")
    p.add_argument("--batch", type=int, default=50, help="examples per client = one step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--only", action="append", choices=["fedloom", "flower"],
                   help="run only this side (repeatable); the floors always run")  # fmt: skip
    p.add_argument("--flower-insecure", action="store_true", help="Flower without TLS")
    p.add_argument("--timeout", type=float, default=1800.0, help="per step, seconds")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="before each step, wait up to this long for other jobs to go quiet",
    )
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="fedloom: GrpcTransport(signed_replies=False), replies left to mutual TLS",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="fedloom: account client CPU per round, yappi on the server and client 0 "
        "(implies --no-write)",
    )
    args = p.parse_args()
    w = Workload(args.clients, args.rounds, args.warmup, args.batch, args.lr)
    only = set(args.only or ["fedloom", "flower"])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC") + (
        f" (revision {revision()})"
    )
    result = measure(
        w,
        only,
        not args.flower_insecure,
        args.timeout,
        args.quiet_wait,
        args.profile,
        args.unsigned,
    )
    command = "flock /tmp/fedloom-bench.lock python bench/deploy/run.py" + (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""
    )
    m = {**result["raw"], "rows": result["rows"]}
    block = render(w, m, command, when, machine())
    print()
    print(block)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    for name in ("results.json", f"results-{stamp}.json"):  # the latest, and one per run
        (RESULTS_DIR / name).write_text(json.dumps(result["raw"], indent=1, default=str))
    if args.profile:
        print()
        print(cpu_summary(w, result["raw"].get("fedloom")))
    if not (args.no_write or args.profile):
        write_benchmarks(BENCHMARKS, block)
        print(f"\nwritten into {BENCHMARKS}")


if __name__ == "__main__":
    main()
