"""Flower 1.42's deployment runtime on the same workload: one `flower-superlink`, one
`flower-supernode` per client, and `flwr run` submitting `bench/deploy/flower_app` (ServerApp:
Flower's FedAvg, timed per round; ClientApp: one SGD step of the same CNN on the node's shard).

Everything runs from `bench/.venv-flower` (made by `bench/peers/setup.sh`), offline:

- `FLWR_HOME` is a fresh folder holding the `config.toml` that names the SuperLink connection
  `flwr run` uses (Flower 1.42 reads connections from there, not from the app's pyproject);
- the SuperLink runs with `--disable-runtime-dependency-installation` (no `uv sync` of the
  app's dependencies; the app declares none and everything it imports is in the venv);
- `FLWR_TELEMETRY_ENABLED=0` and `FLWR_DISABLE_UPDATE_CHECK=1` (no calls home).

With `tls=True` the SuperLink serves its one HTTPS port (Fleet, Control and ServerApp runtime
APIs) with the same test server certificate fedloom uses, and the SuperNodes and `flwr run`
verify it against the test CA. Flower has no client certificates (mutual TLS); its optional
SuperNode authentication uses separate keys and is left off, so this is server-authenticated
TLS only. Both the SuperLink and each SuperNode run their app processes in Flower's default
`subprocess` isolation: each starts a `flower-superexec`, which starts a `flwr-serverapp`
process per run and a `flwr-clientapp` process per message (so per client per round).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from common import FLOWER_APP, FLOWER_BIN, HOST, Processes, Workload, free_port, wait_for_port

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PATH": f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "PYTHONPATH": "",
    "VIRTUAL_ENV": str(FLOWER_BIN.parent),
}


def _config_toml(port: int, certs: Path, tls: bool) -> str:
    """The Flower CLI configuration: one SuperLink connection, `bench`, the default."""
    security = f'root-certificates = "{(certs / "ca.pem").resolve()}"' if tls else "insecure = true"
    return (
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "{HOST}:{port}"\n{security}\n'
    )


def _count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def run_flower(
    w: Workload, prep: Path, certs: Path, work: Path, timeout: float, tls: bool = True
) -> dict[str, Any]:
    """Run the Flower side once; return the ServerApp's JSON result plus its final weights'
    path. Every process it started (SuperExecs and app processes included) is stopped before
    it returns."""
    if not (FLOWER_BIN / "flower-superlink").exists():
        raise RuntimeError("bench/.venv-flower is missing: run `bash bench/peers/setup.sh`")
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    out = (work / "flower.json").resolve()
    out.unlink(missing_ok=True)
    port = free_port()
    (home / "config.toml").write_text(_config_toml(port, certs, tls))
    env = {**FLOWER_ENV, "FLWR_HOME": str(home.resolve())}
    server_tls = (
        ["--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
         "--ssl-ca-certfile", str(certs / "ca.pem")]
        if tls else ["--insecure"]
    )  # fmt: skip
    node_tls = ["--root-certificates", str(certs / "ca.pem")] if tls else ["--insecure"]
    logs = work / "logs-flower"
    with Processes(logs) as procs:
        procs.start(
            "superlink",
            [str(FLOWER_BIN / "flower-superlink"), *server_tls, "--host", HOST,
             "--port", str(port), "--disable-runtime-dependency-installation"],
            env=env, cwd=work,
        )  # fmt: skip
        wait_for_port(port, 60.0)
        for k in range(w.clients):
            procs.start(
                f"supernode-{k:02d}",
                [str(FLOWER_BIN / "flower-supernode"), *node_tls, "--superlink", f"{HOST}:{port}",
                 "--host", HOST, "--port", str(free_port()), "--node-config", f"partition-id={k}"],
                env=env, cwd=work,
            )  # fmt: skip
        deadline = time.monotonic() + 120.0
        while _count(logs / "superlink.log", "Activated node_id") < w.clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all SuperNodes registered (see {logs})")
            time.sleep(0.2)
        run_config = (
            f'prep="{prep.resolve()}" out="{out}" rounds={w.total_rounds} '
            f"clients={w.clients} lr={w.lr}"
        )
        submit = procs.start(
            "flwr-run",
            [str(FLOWER_BIN / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config", run_config],
            env=env, cwd=work,
        )  # fmt: skip
        if submit.wait(timeout=120.0) != 0:
            raise RuntimeError(f"`flwr run` failed (see {logs}/flwr-run.log)")
        deadline = time.monotonic() + timeout
        while not out.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower did not finish in {timeout:g} s (see {logs})")
            if procs.children[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited (see {logs}/superlink.log)")
            time.sleep(0.5)
    result: dict[str, Any] = json.loads(out.read_text())
    result["final"] = str(out.with_suffix(".npz"))
    result["tls"] = tls
    return result
