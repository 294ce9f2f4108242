"""What every part of the deployment benchmark shares: paths, the workload, the prepared inputs,
and a process supervisor that never leaves a process behind.

This module imports neither torch nor fedloom at module level, so the loopback receivers
(`floor.py receiver`) start fast; `prepare` imports them when it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

DEPLOY_DIR = Path(__file__).resolve().parent
BENCH_DIR = DEPLOY_DIR.parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results" / "deploy"  # git-ignored (bench/results/)
FLOWER_BIN = BENCH_DIR / ".venv-flower" / "bin"
FLOWER_APP = DEPLOY_DIR / "flower_app"
HOST = "127.0.0.1"  # everything listens here, nowhere else

#: Every child process runs single-threaded torch and BLAS, like the other benchmarks.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Workload:
    """The benchmark's federated workload.

    `clients` processes, each holding `batch` MNIST training examples (the first `batch` of
    its IID shard of the 60,000), train McMahan et al.'s CNN (`fedloom.models.mnist_cnn`,
    1,663,370 float32 parameters) for exactly one SGD step per round (one epoch over one
    batch of `batch`), learning rate `lr`. FedAvg over all clients every round; `warmup`
    rounds are run and dropped, then `rounds` rounds are timed.
    """

    clients: int = 20
    rounds: int = 10
    warmup: int = 10
    batch: int = 50
    lr: float = 0.1
    seed: int = 0

    @property
    def total_rounds(self) -> int:
        """Rounds run: warm-up plus timed."""
        return self.warmup + self.rounds

    def as_dict(self) -> dict[str, Any]:
        """The fields, for JSON."""
        return asdict(self)


def client_id(k: int) -> str:
    """The id (and certificate common name) of client number k."""
    return f"client-{k:02d}"


def data_root() -> str:
    """`$FEDLOOM_DATA`, else `shared/data` beside the repository."""
    return os.environ.get("FEDLOOM_DATA") or str(REPO.parent / "shared" / "data")


def prepare(prep: Path, w: Workload) -> dict[str, Any]:
    """Write what every runtime reads into `prep`: each client's examples
    (`shard_K_x.npy` float32 (batch, 784) in [0, 1], `shard_K_y.npy` int64) from fedloom's own
    MNIST loader and IID partition, and the initial weights (`initial.npz`, by `state_dict`
    name) of `fedloom.models.mnist_cnn()` after `torch.manual_seed(seed)`."""
    import numpy as np
    import torch

    from fedloom.data import iid, load_mnist
    from fedloom.models import mnist_cnn

    prep.mkdir(parents=True, exist_ok=True)
    train, _ = load_mnist(data_root())
    for k, idx in enumerate(iid(len(train), w.clients, seed=w.seed)):
        if len(idx) < w.batch:
            raise ValueError(f"shard {k} has {len(idx)} examples, fewer than batch {w.batch}")
        part = train.subset(idx[: w.batch])
        np.save(prep / f"shard_{k}_x.npy", np.ascontiguousarray(part.x, dtype=np.float32))
        np.save(prep / f"shard_{k}_y.npy", part.y.astype(np.int64))
    torch.manual_seed(w.seed)
    model = mnist_cnn()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(prep / "initial.npz", **state)
    n_params = int(sum(p.numel() for p in model.parameters()))
    meta = {"parameters": n_params, "model_bytes": 4 * n_params, **w.as_dict()}
    (prep / "meta.json").write_text(json.dumps(meta))
    (prep / "workload.json").write_text(json.dumps(w.as_dict()))
    return meta


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that need a number)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {HOST}:{port} after {timeout:g} s"
                ) from None
            time.sleep(0.1)


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat from the state on) of every process now."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        yield int(entry), stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "


def _sessions_of(sids: set[int]) -> list[int]:
    """Pids of every live process whose session id is in `sids` (from /proc)."""
    # fields[3]: session id
    return [pid for pid, fields in _proc_stats() if int(fields[3]) in sids and fields[0] != "Z"]


class Processes:
    """Starts child processes, each in its own session, and stops every process of those
    sessions on `stop_all` (also when used as a context manager): the children and anything
    they start (Flower's SuperExec and ClientApp processes) unless it calls setsid itself.
    SIGTERM first, SIGKILL for whatever is left after `grace` seconds."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in a new session; its output goes to `logs/NAME.log` (stdout to a pipe
        with `stdout_pipe`, stderr still to the log)."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        self._files.append(log)
        child = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **THREAD_ENV, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        self.children.append(child)
        return child

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process of every session started here, then reap the children."""
        sids = {c.pid for c in self.children}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _sessions_of(sids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
            while time.monotonic() < deadline:
                for c in self.children:
                    c.poll()
                if not _sessions_of(sids):
                    break
                time.sleep(0.1)
        for c in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.wait(timeout=2.0)
            if c.stdout is not None:
                c.stdout.close()
        for f in self._files:
            f.close()
        left = _sessions_of(sids)
        if left:
            raise RuntimeError(f"processes still alive after SIGKILL: {left}")
        self.children.clear()
        self._files.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _proc_table() -> dict[tuple[int, int], tuple[int, float]]:
    """Every process: (pid, start time in ticks) -> (parent pid, CPU seconds used so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    return {
        (pid, int(f[19])): (int(f[1]), (int(f[11]) + int(f[12])) / tick) for pid, f in _proc_stats()
    }


class Interference:
    """Measures the CPU that processes other than this one and its descendants use while a
    step runs (other jobs on a shared machine), sampling /proc every `period` seconds in a
    thread. Processes that start and end between two samples are missed, so it is a lower
    bound. `cores` = their CPU seconds / the step's wall seconds."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.cores = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        base = {k: cpu for k, (_, cpu) in _proc_table().items()}
        last: dict[tuple[int, int], float] = {}
        ours: set[tuple[int, int]] = set()
        start = time.monotonic()
        while True:
            table = _proc_table()
            by_pid = {pid: (k, ppid) for k, (ppid, _) in table.items() for pid in [k[0]]}
            for key, (_, cpu) in table.items():
                pid, seen = key[0], set()
                while pid > 1 and pid not in seen:  # walk up: is `me` an ancestor?
                    seen.add(pid)
                    if pid == me:
                        ours.add(key)
                        break
                    pid = by_pid[pid][1] if pid in by_pid else 0
                if key not in ours:
                    last[key] = cpu
            others = sum(cpu - base.get(k, 0.0) for k, cpu in last.items() if k not in ours)
            self.cores = others / max(time.monotonic() - start, 1e-9)
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> Interference:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_quiet(limit: float, threshold: float = 0.3, window: float = 3.0) -> float:
    """Wait up to `limit` seconds for other processes to use less than `threshold` cores over
    a `window`-second sample; return the last sample's cores (the caller records it)."""
    deadline = time.monotonic() + limit
    while True:
        with Interference(period=window / 3) as probe:
            time.sleep(window)
        if probe.cores < threshold or time.monotonic() >= deadline:
            return probe.cores
