"""Helpers for the deployment tests that run real `fedloom server` / `fedloom client` processes
on 127.0.0.1: a process group that kills everything it started, and trainers that client
processes build with `fedloom client --trainer deploy_helpers:NAME`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import fedloom
from fedloom.config import load_config
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

SRC = Path(fedloom.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that must restart on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A `fedloom ...` process whose stdout and stderr are read into lists as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fedloom", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
            for stream, lines in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, timeout: float = 60.0, stream: str = "out") -> str:
        """Block until a line of stdout (or stderr) contains `text`; return that line."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if text in line:
                    return line
            if self.popen.poll() is not None and all(not r.is_alive() for r in self._readers):
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {stream} line with {text!r} from fedloom {' '.join(self.args[:1])} "
            f"(exit {self.popen.poll()}):\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit (and its output to be read); its exit status."""
        status = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self) -> None:
        """kill -9 (if still running) and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait(10)


class Procs:
    """Starts `fedloom` processes; `procs()` kills every one it started when the test ends."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        pythonpath = os.pathsep.join([str(SRC), str(TESTS), str(TESTS / "runtime")])
        self.env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
        self.started: list[Proc] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), {**self.env, **(env or {})})
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.started:
            proc.kill()


@contextmanager
def procs(env: dict[str, str] | None = None) -> Iterator[Procs]:
    """A `Procs` whose processes are all killed on the way out, even when the test fails; their
    output is printed then (pytest shows it with a failure)."""
    group = Procs(env)
    try:
        yield group
    finally:
        group.kill_all()
        for proc in group.started:  # pytest shows this output when the test failed
            print(f"=== fedloom {' '.join(proc.args)}\n{proc.stdout}--- stderr\n{proc.stderr}")


def wait_until(condition: object, timeout: float, what: str) -> None:
    """Poll `condition()` every 20 ms until it is true; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- trainers built in client processes (`--trainer deploy_helpers:NAME`) ---------------------
class Paced:
    """A config client's trainer that announces each fit by creating the file
    `$FEDLOOM_TEST_MARKERS/<client id>-r<round>`, then sleeps `$FEDLOOM_TEST_DELAY` seconds
    before fitting (only in round `$FEDLOOM_TEST_SLOW_ROUND` if set, and only the first time
    it fits that round), so that a test can act while the client is mid-round, or forever with
    `$FEDLOOM_TEST_STUCK` set. Its updates are exactly those of the wrapped trainer."""

    def __init__(self, client_id: str, inner: Trainer) -> None:
        self.client_id = client_id
        self.inner = inner
        self.markers = Path(os.environ["FEDLOOM_TEST_MARKERS"])
        self.delay = float(os.environ.get("FEDLOOM_TEST_DELAY", "0"))
        self.stuck = bool(os.environ.get("FEDLOOM_TEST_STUCK"))
        slow = os.environ.get("FEDLOOM_TEST_SLOW_ROUND")
        self.slow_round = int(slow) if slow else None

    def initial_params(self) -> Params:
        return self.inner.initial_params()

    def fit(self, params: Params, config: FitConfig) -> Update:
        marker = self.markers / f"{self.client_id}-r{config.round}"
        again = marker.exists()
        marker.touch()
        if self.stuck:
            time.sleep(600)
        elif self.slow_round is None or (self.slow_round == config.round and not again):
            time.sleep(self.delay)
        return self.inner.fit(params, config)

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return self.inner.evaluate(params, config)


def paced(client_id: str) -> Paced:
    """`Paced` around client `client-K` of the run config `$FEDLOOM_TEST_CONFIG`."""
    from fedloom.deploy import config_trainer

    config = load_config(os.environ["FEDLOOM_TEST_CONFIG"])
    cid, trainer = config_trainer(config, int(client_id.rsplit("-", 1)[1]))
    assert cid == client_id, (cid, client_id)
    return Paced(client_id, trainer)


class Idle:
    """A trainer for clients that only connect (enrolment tests): a one-parameter model."""

    def initial_params(self) -> Params:
        return Params.from_arrays({"w": np.zeros(1, dtype=np.float32)})

    def fit(self, params: Params, config: FitConfig) -> Update:
        return Update(params * 0.0, 1, 1, {})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return Evaluation(1, {})


def idle(client_id: str) -> Idle:
    return Idle()


class Failing:
    """Raises on every fit: how a simulation stands in for a client that is gone."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner

    def initial_params(self) -> Params:
        return self.inner.initial_params()

    def fit(self, params: Params, config: FitConfig) -> Update:
        raise RuntimeError("gone")

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        return self.inner.evaluate(params, config)
