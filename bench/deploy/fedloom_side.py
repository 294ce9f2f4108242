"""fedloom over gRPC: a `GrpcTransport` server running `Federation` + FedAvg, and one OS process
per client running `run_participant` with a `TorchTrainer`; mutual TLS with per-client test
certificates (`fedloom.certs.write_test_pki(folder, clients=ids)`: the server admits a client
only under its certificate's common name).

`run_fedloom` (called by `run.py`) starts the server process, reads the port it bound, starts
the client processes, and returns the server's measurements. The same file is the entry point
of both kinds of child process:

    python bench/deploy/fedloom_side.py server PREP CERTS OUT.json [--profile] [--unsigned]
    python bench/deploy/fedloom_side.py client PREP CERTS HOST:PORT K [--no-train]

With `--no-train` the clients' trainer returns a zero update without training: the round is
then the transport alone (dispatch, the model down, decoding, encoding, signing, the update
up, checks, aggregation), the direct measure of what fedloom adds to moving the bytes.

Round times are the server's `time.perf_counter` stamps: round r lasts from the end of round
r - 1 (`on_round`; for round 1, just before `Federation.run`) to the end of round r, so they
include selection, dispatch, the clients' work, the replies, validation, aggregation and the
strategy update (no evaluation: none is configured). Each client's compute is its
`Reply.seconds` (`run_task`'s wall time in the client process: loading the model into the
module, the SGD step, the delta), as recorded in the round's `ClientRecord`s.

With `profile=True` (`run.py --profile`) two things are added, neither of which the timed
configuration has: each client's trainer is wrapped so that its update's metrics carry the
client process's CPU seconds (`cpu_fit`: inside `fit`; `cpu_total`: since the process
started) and its minor page faults so far (`faults`), and the server and client 0 run under
yappi (CPU clock, all threads) over the timed rounds, if yappi can be imported
(`PYTHONPATH` with a yappi install; it is not a dependency).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST, REPO, Processes, Workload, client_id

HERE = Path(__file__).resolve()


def _model_params(prep: Path) -> Any:
    """The initial weights as fedloom `Params` (through the module, in `state_dict` order)."""
    import numpy as np
    import torch

    from fedloom.adapters.torch_trainer import params_from_module
    from fedloom.models import mnist_cnn

    model = mnist_cnn()
    with np.load(prep / "initial.npz") as z:
        model.load_state_dict({k: torch.from_numpy(z[k].copy()) for k in z.files})
    return params_from_module(model)


def server_main(prep: Path, certs: Path, out: Path, profile: bool, unsigned: bool) -> None:
    """The server process: listen, wait for every client, run the rounds, write the result."""
    import numpy as np
    import torch

    from fedloom import FedAvg, Federation, Settings
    from fedloom.certs import PkiFiles
    from fedloom.runtime.federation import RoundResult
    from fedloom.runtime.remote import GrpcTransport

    torch.set_num_threads(1)
    w = Workload(**json.loads((prep / "workload.json").read_text()))
    files = PkiFiles.in_folder(certs)
    initial = _model_params(prep)
    transport = GrpcTransport(
        f"{HOST}:0",
        server_cert=files.server_cert.read_bytes(),
        server_key=files.server_key.read_bytes(),
        client_ca=files.ca.read_bytes(),
        timeout=300.0,
        signed_replies=not unsigned,
    )
    print(f"LISTENING {transport.address}", flush=True)
    try:
        ids = transport.wait_for_clients(w.clients, timeout=300.0)
        if len(ids) < w.clients:
            raise SystemExit(f"only {len(ids)} of {w.clients} clients connected")
        settings = Settings(
            rounds=w.total_rounds,
            fraction_fit=1.0,
            min_fit_clients=w.clients,
            max_retries=0,
            epochs=1,
            batch_size=w.batch,
            learning_rate=w.lr,
            seed=w.seed,
        )
        stamps: list[float] = []
        cpu: list[float] = []
        rounds: list[dict[str, Any]] = []
        profiler = _Profiler(out.with_name("profile-server.txt")) if profile else None

        def on_round(r: RoundResult) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            rec = r.record
            rounds.append(
                {
                    "seconds": stamps[-1] - stamps[-2],
                    "record_seconds": rec.seconds,
                    "server_cpu": cpu[-1] - cpu[-2],
                    "accepted": rec.num_accepted,
                    "bytes_down": rec.bytes_down,
                    "bytes_up": rec.bytes_up,
                    "client_seconds": [c.seconds for c in rec.clients],
                    "client_metrics": {c.client_id: c.metrics for c in rec.clients},
                }
            )
            if profiler is not None and rec.round == w.warmup:
                profiler.start()
            if profiler is not None and rec.round == w.total_rounds:
                profiler.stop()

        with Federation(FedAvg(), transport, ids, settings, on_round=on_round) as federation:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            result = federation.run(initial)
        final = result.state.params
        arrays = {name: np.asarray(final[name]) for name in final}
        np.savez(out.with_suffix(".npz"), **arrays)  # type: ignore[arg-type]
        out.write_text(json.dumps({"rounds": rounds, "clients": ids}))
    finally:
        transport.close()


def client_main(
    prep: Path, certs: Path, address: str, k: int, profile: bool, train: bool = True
) -> None:
    """One client process: its shard, a `TorchTrainer` around the CNN, `run_participant`
    (with `train=False`, a trainer that returns a zero update without training)."""
    import numpy as np
    import torch

    from fedloom.adapters import TorchTrainer
    from fedloom.certs import PkiFiles
    from fedloom.core.trainer import Trainer
    from fedloom.models import mnist_cnn
    from fedloom.runtime.participant import run_participant

    torch.set_num_threads(1)
    x = np.load(prep / f"shard_{k}_x.npy")
    y = np.load(prep / f"shard_{k}_y.npy")
    trainer: Trainer = TorchTrainer(mnist_cnn(), (x, y))
    profiler = None
    if not train:
        trainer = _NoTraining(trainer)
    if profile:
        trainer = _Accounted(trainer)
        if k == 0:
            profiler = _Profiler(prep.parent / "profile-client-00.txt")
            profiler.start()
    files = PkiFiles.in_folder(certs)
    cid = client_id(k)
    cert, key = files.client_files(cid)
    run_participant(
        address,
        cid,
        trainer,
        root_cert=files.ca.read_bytes(),
        cert_chain=cert.read_bytes(),
        private_key=key.read_bytes(),
        retry_for=60.0,
        log=lambda m: None,
    )
    if profiler is not None:
        profiler.stop()


class _Wrapped:
    """A trainer around another one: everything but `fit` goes to `inner`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def initial_params(self) -> Any:
        return self.inner.initial_params()

    def evaluate(self, params: Any, config: Any) -> Any:
        return self.inner.evaluate(params, config)


class _NoTraining(_Wrapped):
    """A trainer whose `fit` returns a zero update at once (`run.py`'s transport-only run)."""

    def fit(self, params: Any, config: Any) -> Any:
        import numpy as np

        from fedloom.core.types import Update

        return Update(params.with_flat(np.zeros_like(params.flat)), config.batch_size, 0, {})


class _Accounted(_Wrapped):
    """A trainer that adds its process's CPU seconds to each update's metrics (`--profile`)."""

    def fit(self, params: Any, config: Any) -> Any:
        start = time.process_time()
        update = self.inner.fit(params, config)
        end = time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        metrics = {**update.metrics, "cpu_fit": end - start, "cpu_total": end, "faults": faults}
        return replace(update, metrics=metrics)


class _Profiler:
    """yappi over every thread, CPU clock; writes the top functions by own time to `path`.
    Does nothing when yappi cannot be imported."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            yappi = importlib.import_module("yappi")
        except ImportError:
            self.yappi: Any = None
            return
        self.yappi = yappi
        yappi.set_clock_type("cpu")

    def start(self) -> None:
        if self.yappi is not None:
            self.yappi.start(builtins=True, profile_threads=True)

    def stop(self) -> None:
        if self.yappi is None:
            return
        self.yappi.stop()
        stats = self.yappi.get_func_stats()
        total = sum(s.tsub for s in stats)
        lines = [f"total CPU seconds (all threads, own time): {total:.3f}"]
        for st in sorted(stats, key=lambda s: s.tsub, reverse=True)[:40]:
            where = f"{Path(st.module).name}:{st.lineno}" if st.module else "?"
            lines.append(f"{st.tsub:9.3f} {st.ttot:9.3f} {st.ncall:9d}  {st.name}  ({where})")
        self.path.write_text("\n".join(lines) + "\n")


def write_pki(certs: Path, w: Workload) -> None:
    """A test CA, the server certificate (127.0.0.1, localhost) and one certificate per client."""
    from fedloom.certs import write_test_pki

    write_test_pki(certs, clients=[client_id(k) for k in range(w.clients)])


def run_fedloom(
    w: Workload,
    prep: Path,
    certs: Path,
    work: Path,
    timeout: float,
    profile: bool = False,
    unsigned: bool = False,
    train: bool = True,
) -> dict[str, Any]:
    """Run the fedloom side once; return the server's JSON result plus its final weights' path.
    With `train=False` the clients return zero updates without training (the transport alone).
    Every process it started is stopped before it returns."""
    out = work / ("fedloom.json" if train else "fedloom-transport.json")
    out.unlink(missing_ok=True)
    py = sys.executable
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    flag = ["--profile"] if profile else []
    client_flag = flag if train else [*flag, "--no-train"]
    server_flag = [*flag, "--unsigned"] if unsigned else flag
    with Processes(work / ("logs-fedloom" if train else "logs-fedloom-transport")) as procs:
        server = procs.start(
            "server", [py, str(HERE), "server", str(prep), str(certs), str(out), *server_flag],
            env=env, stdout_pipe=True,
        )  # fmt: skip
        assert server.stdout is not None
        line = server.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"fedloom server did not start (see {procs.logs}/server.log)")
        address = line.split()[1]
        for k in range(w.clients):
            procs.start(
                f"client-{k:02d}",
                [py, str(HERE), "client", str(prep), str(certs), address, str(k), *client_flag],
                env=env,
            )
        rc = server.wait(timeout=timeout)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"fedloom server exited with {rc} (see {procs.logs}/server.log)")
    result: dict[str, Any] = json.loads(out.read_text())
    result["final"] = str(out.with_suffix(".npz"))
    return result


def main(argv: list[str]) -> None:
    """Child entry points: `server PREP CERTS OUT` or `client PREP CERTS ADDRESS K`."""
    profile, unsigned, train = "--profile" in argv, "--unsigned" in argv, "--no-train" not in argv
    argv = [a for a in argv if a not in ("--profile", "--unsigned", "--no-train")]
    kind, prep, certs = argv[0], Path(argv[1]), Path(argv[2])
    if kind == "server":
        server_main(prep, certs, Path(argv[3]), profile, unsigned)
    elif kind == "client":
        client_main(prep, certs, argv[3], int(argv[4]), profile, train)
    else:
        raise SystemExit(f"unknown role {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
