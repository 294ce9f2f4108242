"""ClientApp: one plain SGD step of the MNIST CNN on this node's shard (the whole shard is one
batch, as fedloom's `TorchTrainer` does with `batch_size` = shard size and one epoch).

The node's shard comes from its node config (`flower-supernode --node-config
'partition-id=K'`); the prepared data folder and learning rate from the run config. The model
and the shard are cached in the ClientApp process for as long as it lives.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.nn import functional as F

from fedloombench.task import load_shard, mnist_cnn

app = ClientApp()
_CACHE: dict[str, Any] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, take one SGD step on the shard, return the new weights."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    k = int(context.node_config["partition-id"])
    prep = str(context.run_config["prep"])
    lr = float(context.run_config["lr"])
    key = f"{prep}/{k}"
    if key not in _CACHE:
        _CACHE[key] = load_shard(prep, k)
    if "model" not in _CACHE:
        _CACHE["model"] = mnist_cnn()
    x, y = _CACHE[key]
    model = _CACHE["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    params = list(model.parameters())
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in params:
            p.sub_(p.grad, alpha=lr)
    seconds = time.perf_counter() - start
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(x), "train-seconds": seconds}),
        }
    )
    return Message(content=content, reply_to=msg)
