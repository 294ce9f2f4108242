"""One workload of `bench/peers/run.py` on Flower's simulation runtime (Flower 1.42 Message API).

Run with the Python of `bench/.venv-flower` (made by `bench/peers/setup.sh`), never with
fedloom's environment: flwr is not installed there, and fedloom's tests never import this file.

    bench/.venv-flower/bin/python bench/peers/flower_sim.py PREP_DIR WORKLOAD OUT.json

`PREP_DIR` holds what `run.py` prepared from fedloom's own loaders, so that every runtime does
the same work: MNIST as float32 arrays (`train_x.npy`, ...), and per workload `WORKLOAD.npz`
(client partition, initial weights, each round's clients and local shuffling seeds) plus
`WORKLOAD.json` (model shape and hyperparameters).

What runs: a `ServerApp` whose `main` calls `FedAvg.start` (Flower's own message-based FedAvg:
its weighted aggregation, its round loop), and a `ClientApp` whose `@app.train` does the same
mini-batch SGD as the plain PyTorch floor of `bench/core_runtimes.py`. The only change to
FedAvg is `configure_train`: instead of sampling nodes at random it sends round r's task to the
nodes of the clients that fedloom and the floor draw in round r (node i, in sorted node-id
order, is client i), with the client's index and local seed in the task's `ConfigRecord`.
`flwr.simulation.run_simulation` runs it on the Ray backend with one CPU per client, so two
ClientApps train at once on a 2-core machine. Client-side evaluation is off (as in the other
runtimes); the final model is evaluated once, on the server, after the last round.

Round times are server-side `time.perf_counter` stamps: round r lasts from the end of round
r - 1's aggregation (for round 1: the entry of `configure_train`) to the end of round r's.
The results go to `OUT.json`; the caller measures wall time and memory of the whole process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

try:
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
except ImportError as exc:  # fedloom's environment: this file is not meant to run there
    raise SystemExit(
        "flower_sim.py needs flwr: run it with bench/.venv-flower/bin/python "
        "(made by bench/peers/setup.sh)"
    ) from exc

#: Per-process caches of the ClientApp side (each Ray actor fills its own once).
_DATA: dict[str, Any] = {}
_MODELS: dict[tuple[int, ...], nn.Module] = {}


def new_model(hidden: Iterable[int]) -> nn.Module:
    """The MLP of `fedloom.models.mlp(784, hidden, 10)`: Linear/ReLU pairs, then Linear."""
    layers: list[nn.Module] = []
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _load(prep: str, workload: str) -> dict[str, Any]:
    """The prepared arrays of one workload, memory-mapped, cached per process."""
    key = f"{prep}/{workload}"
    if key not in _DATA:
        root = Path(prep)
        with np.load(root / f"{workload}.npz") as z:
            parts = {name: z[name] for name in ("index", "offsets")}
        _DATA[key] = {
            "x": np.load(root / "train_x.npy", mmap_mode="r"),
            "y": np.load(root / "train_y.npy", mmap_mode="r"),
            **parts,
            "meta": json.loads((root / f"{workload}.json").read_text()),
        }
    return _DATA[key]


# ---------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the client named in the task: the floor's mini-batch SGD."""
    del context  # the client comes from the task, not from the node
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    data = _load(str(cfg["prep"]), str(cfg["workload"]))
    meta = data["meta"]
    k = int(cfg["client"])
    idx = data["index"][data["offsets"][k] : data["offsets"][k + 1]]
    x = torch.from_numpy(np.ascontiguousarray(data["x"][idx]))
    y = torch.from_numpy(np.ascontiguousarray(data["y"][idx]))
    hidden = tuple(meta["hidden"])
    if hidden not in _MODELS:
        _MODELS[hidden] = new_model(hidden)
    model = _MODELS[hidden]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    params = list(model.parameters())
    n, batch, lr = len(x), int(meta["batch"]), float(meta["lr"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    for _ in range(int(meta["epochs"])):
        perm = torch.randperm(n, generator=gen)
        xs, ys = x.index_select(0, perm), y.index_select(0, perm)
        for xb, yb in zip(xs.split(batch), ys.split(batch), strict=True):
            for p in params:
                p.grad = None
            F.cross_entropy(model(xb), yb).backward()
            with torch.no_grad():
                for p in params:
                    p.sub_(p.grad, alpha=lr)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------- ServerApp


class SameClientsFedAvg(FedAvg):
    """Flower's FedAvg, sending each round to the clients fedloom draws, and timing rounds."""

    def __init__(self, prep: str, workload: str, draws: np.ndarray, seeds: np.ndarray) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0)
        self.prep, self.workload = prep, workload
        self.draws, self.seeds = draws, seeds
        self.stamps: list[float] = []
        self.nodes: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One task per drawn client, to that client's node, with its seed."""
        if not self.stamps:
            self.stamps.append(time.perf_counter())
        if not self.nodes:
            need = int(self.draws.max()) + 1
            while len(nodes := sorted(grid.get_node_ids())) < need:
                time.sleep(0.1)
            self.nodes = nodes
        messages = []
        for k, seed in zip(self.draws[server_round - 1], self.seeds[server_round - 1], strict=True):
            task = ConfigRecord(
                {
                    "server-round": server_round,
                    "client": int(k),
                    "seed": int(seed),
                    "prep": self.prep,
                    "workload": self.workload,
                }
            )
            content = RecordDict({"arrays": arrays, "config": task})
            messages.append(
                Message(
                    content=content,
                    message_type=MessageType.TRAIN,
                    dst_node_id=self.nodes[int(k)],
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average; stamp the end of the round."""
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        if len(replies) != len(self.draws[server_round - 1]) or out[0] is None:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, some failed")
        self.stamps.append(time.perf_counter())
        print(f"PEERS-ROUND {server_round} {self.stamps[-1] - self.stamps[-2]:.6f}", flush=True)
        return out


def make_server_app(prep: str, workload: str, out: Path) -> ServerApp:
    """The ServerApp: FedAvg.start over the prepared rounds, then one test evaluation."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        root = Path(prep)
        with np.load(root / f"{workload}.npz") as z:
            draws, seeds = z["draws"], z["seeds"]
            names = [str(s) for s in z["names"]]
            init = {name: torch.from_numpy(z[f"init_{i}"]) for i, name in enumerate(names)}
        meta = json.loads((root / f"{workload}.json").read_text())
        strategy = SameClientsFedAvg(prep, workload, draws, seeds)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(init),
            num_rounds=len(draws),
            timeout=3600,
        )
        model = new_model(meta["hidden"])
        model.load_state_dict(result.arrays.to_torch_state_dict())
        tx = torch.from_numpy(np.load(root / "test_x.npy"))
        ty = torch.from_numpy(np.load(root / "test_y.npy"))
        with torch.no_grad():
            acc = float((model(tx).argmax(dim=1) == ty).double().mean())
        times = [b - a for a, b in zip(strategy.stamps, strategy.stamps[1:], strict=False)]
        out.write_text(json.dumps({"round_seconds": times, "accuracy": acc}))

    return server_app


def main(argv: list[str]) -> None:
    """Run one prepared workload on Flower's simulation runtime (Ray backend)."""
    prep, workload, out = str(Path(argv[0]).resolve()), argv[1], Path(argv[2])
    meta = json.loads((Path(prep) / f"{workload}.json").read_text())
    torch.set_num_threads(1)
    run_simulation(
        server_app=make_server_app(prep, workload, out),
        client_app=client_app,
        num_supernodes=int(meta["n_clients"]),
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    if not out.exists():
        raise SystemExit("the ServerApp wrote no result (see the log above)")


if __name__ == "__main__":
    main(sys.argv[1:])
