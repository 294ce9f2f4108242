"""ServerApp: Flower's own FedAvg over all 20 nodes each round, timed per round.

Round times are server-side `time.perf_counter` stamps, like fedloom's: round r lasts from the
end of round r - 1's aggregation (for round 1: the entry of `configure_train`) to the end of
round r's. The ClientApps' own training seconds come back in their metrics. At the end the
ServerApp writes, as JSON to the run config's `out`, the round times, the per-round client
seconds and the final weights' path (`out` with `.npz`), for `run.py` to compare with fedloom's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedloombench.task import load_initial

app = ServerApp()


class TimedFedAvg(FedAvg):
    """Flower's FedAvg on every node each round, with round stamps and client seconds."""

    def __init__(self, clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        self.clients = clients
        self.stamps: list[float] = []
        self.client_seconds: list[list[float]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's own configuration; stamp the start of the first round."""
        if not self.stamps:
            self.stamps.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average; stamp the end of the round."""
        replies = list(replies)
        if len(replies) != self.clients or any(r.has_error() for r in replies):
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, or some failed")
        self.client_seconds.append([float(r.content["metrics"]["train-seconds"]) for r in replies])
        out = super().aggregate_train(server_round, replies)
        self.stamps.append(time.perf_counter())
        print(f"DEPLOY-ROUND {server_round} {self.stamps[-1] - self.stamps[-2]:.6f}", flush=True)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg.start for `rounds` rounds from the prepared initial weights; write the result."""
    cfg = context.run_config
    prep, out = str(cfg["prep"]), Path(str(cfg["out"]))
    strategy = TimedFedAvg(int(cfg["clients"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(load_initial(prep)),
        num_rounds=int(cfg["rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        timeout=3600,
    )
    final = result.arrays.to_torch_state_dict()
    np.savez(out.with_suffix(".npz"), **{k: v.numpy() for k, v in final.items()})
    rounds = [b - a for a, b in zip(strategy.stamps, strategy.stamps[1:], strict=False)]
    result = {"round_seconds": rounds, "client_seconds": strategy.client_seconds}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)  # the caller polls for `out`: it appears complete or not at all
