"""From a validated `RunConfig` to a running federation: data, clients, model, strategy, runtime.

Everything here is assembly; the algorithms live in their own modules. Torch is imported only
for torch models, so the embedded default runs with NumPy alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedloom.algorithms import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    Strategy,
)
from fedloom.config import DataConfig, ModelConfig, RunConfig, StrategyConfig
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.core.types import Metrics
from fedloom.data import (
    ArrayDataset,
    FederatedDataset,
    load_fashion_mnist,
    load_femnist,
    load_mnist,
    load_shakespeare,
    load_sklearn,
    partition,
)
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, RoundResult, RunResult
from fedloom.runtime.processes import ProcessTransport
from fedloom.runtime.transport import InProcessTransport, Transport
from fedloom.store import RunStore


@dataclass
class Clients:
    """Each client's train and held-out data, the server's test set and the label count."""

    parts: dict[str, tuple[ArrayDataset, ArrayDataset]]
    test: ArrayDataset
    num_classes: int


def build_strategy(config: StrategyConfig, num_clients: int) -> Strategy:
    """The configured server algorithm with its hyperparameters."""
    lr = config.server_lr
    name = config.name
    if name == "fedavg":
        return FedAvg(server_lr=lr if lr is not None else 1.0)
    if name == "fedavgm":
        return FedAvgM(server_lr=lr if lr is not None else 1.0, momentum=config.momentum)
    if name == "fedprox":
        return FedProx(mu=config.mu, server_lr=lr if lr is not None else 1.0)
    if name == "scaffold":
        return Scaffold(num_clients=num_clients, server_lr=lr if lr is not None else 1.0)
    adaptive_lr = lr if lr is not None else 0.01
    if name == "fedadagrad":
        return FedAdagrad(server_lr=adaptive_lr, beta1=config.beta1, tau=config.tau)
    adaptive = FedAdam if name == "fedadam" else FedYogi
    return adaptive(server_lr=adaptive_lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau)


def load_clients(config: DataConfig, seed: int) -> Clients:
    """Load the dataset and split it into clients as configured (seeded)."""
    if config.dataset in ("femnist", "shakespeare"):
        fed: FederatedDataset = (
            load_femnist(config.data_dir, max_clients=config.max_clients)
            if config.dataset == "femnist"
            else load_shakespeare(config.data_dir, max_clients=config.max_clients)
        )
        ids = fed.client_ids[: config.max_clients] if config.max_clients else fed.client_ids
        parts = {cid: fed.clients[cid] for cid in ids}
        test = ArrayDataset(
            np.concatenate([p[1].x for p in parts.values()]),
            np.concatenate([p[1].y for p in parts.values()]),
        )
        return Clients(parts, test, fed.num_classes)
    if config.dataset in ("mnist", "fashion_mnist"):
        loader = load_mnist if config.dataset == "mnist" else load_fashion_mnist
        train, test = loader(config.data_dir)
        num_classes = 10
    else:
        sk_name: Literal["breast_cancer", "digits", "wine"] = config.dataset  # type: ignore[assignment]
        train, test = load_sklearn(sk_name, seed=seed)
        num_classes = int(max(train.y.max(), test.y.max())) + 1
    n = config.num_clients
    if config.partition == "iid":
        indices = partition.iid(len(train), n, seed)
    elif config.partition == "dirichlet":
        indices = partition.dirichlet(train.y, n, config.alpha, seed)
    elif config.partition == "shards":
        indices = partition.shards(train.y, n, seed, shards_per_client=config.shards_per_client)
    else:
        indices = partition.quantity_skew(len(train), n, seed, alpha=config.alpha)
    rng = np.random.default_rng([seed, 17])
    parts = {}
    for i, idx in enumerate(indices):
        idx = rng.permutation(idx)
        held = round(len(idx) * config.client_test_fraction)
        parts[f"client-{i:0{len(str(n - 1))}d}"] = (
            train.subset(idx[held:]),
            train.subset(idx[:held]),
        )
    return Clients(parts, test, num_classes)


def prepared_clients(config: RunConfig) -> Clients:
    """The clients of `config`'s data split, standardized when its model needs that (linear
    models); what every runtime of the config trains on."""
    clients = load_clients(config.data, config.federation.seed)
    if config.model.kind in ("logistic", "sklearn_sgd"):
        clients = standardize(clients)
    return clients


def standardize(clients: Clients) -> Clients:
    """Federated feature standardization: clients report only per-feature sums, sums of squares
    and counts; the server combines them into one mean and scale that every client applies."""
    total = sum(len(tr) for tr, _ in clients.parts.values())
    s1 = sum(tr.x.astype(np.float64).sum(axis=0) for tr, _ in clients.parts.values())
    s2 = sum((tr.x.astype(np.float64) ** 2).sum(axis=0) for tr, _ in clients.parts.values())
    mean = s1 / total
    scale = np.sqrt(np.maximum(s2 / total - mean**2, 1e-12))

    def apply(d: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(((d.x - mean) / scale).astype(np.float32), d.y)

    parts = {cid: (apply(tr), apply(te)) for cid, (tr, te) in clients.parts.items()}
    return Clients(parts, apply(clients.test), clients.num_classes)


def build_trainers(
    model: ModelConfig, clients: Clients
) -> tuple[dict[str, Trainer], Params, Callable[[Params], Metrics]]:
    """One trainer per client, the initial model, and the centralized evaluation function."""
    from fedloom.core.types import EvalConfig

    n_features = int(np.prod(clients.test.x.shape[1:]))
    if model.kind == "logistic":
        from fedloom.adapters import NumpyTrainer, softmax_regression

        make: Callable[[ArrayDataset, ArrayDataset | None], Trainer] = lambda tr, te: (  # noqa: E731
            NumpyTrainer(
                softmax_regression(n_features, clients.num_classes, l2=model.l2),
                (tr.x, tr.y),
                (te.x, te.y) if te is not None else None,
            )
        )
    elif model.kind == "sklearn_sgd":
        from sklearn.linear_model import SGDClassifier

        from fedloom.adapters import SklearnTrainer

        classes = np.arange(clients.num_classes)
        make = lambda tr, te: SklearnTrainer(  # noqa: E731
            SGDClassifier(loss="log_loss", alpha=max(model.l2, 1e-6)),
            (tr.x, tr.y),
            (te.x, te.y) if te is not None else None,
            classes=classes,
        )
    else:
        import torch

        from fedloom import models
        from fedloom.adapters import TorchTrainer

        torch.manual_seed(0)
        if model.kind == "mlp":
            module: torch.nn.Module = models.mlp(n_features, model.hidden, clients.num_classes)
        elif model.kind == "cnn":
            fc = model.hidden[0] if model.hidden else 512
            module = models.mnist_cnn(clients.num_classes, fc=fc)
        else:
            module = models.CharLSTM(vocab=clients.num_classes)
        make = lambda tr, te: TorchTrainer(  # noqa: E731
            module, (tr.x, tr.y), (te.x, te.y) if te is not None and len(te) else None
        )
    trainers = {cid: make(tr, te if len(te) else None) for cid, (tr, te) in clients.parts.items()}
    server = make(clients.test, clients.test)
    initial = server.initial_params()

    def evaluate(params: Params) -> Metrics:
        return server.evaluate(params, EvalConfig(round=0)).metrics

    return trainers, initial, evaluate


def build_transport(config: RunConfig, trainers: dict[str, Trainer]) -> Transport:
    """The configured runtime over these clients (Ray is imported only for kind = "ray")."""
    if config.runtime.kind == "ray":
        from fedloom.runtime.ray_transport import RayTransport

        return RayTransport(trainers, address=config.runtime.address, actors=config.runtime.actors)
    pool = ClientPool(trainers)
    if config.runtime.kind == "processes":
        return ProcessTransport(pool, workers=config.runtime.workers)
    return InProcessTransport(pool)


def run_experiment(
    config: RunConfig,
    store_path: Path,
    *,
    resume: str | None = None,
    quiet: bool = False,
    transport: Transport | None = None,
    client_ids: Sequence[str] | None = None,
    resume_hint: str = "fedloom run --resume {run_id}",
) -> int:
    """Run (or resume) `config`, recording into `store_path`; print progress and the table.
    On Ctrl-C the run is recorded as interrupted and `resume_hint` (formatted with `run_id`)
    tells how to continue it; returns 130 then.

    By default the clients are simulated as the config says. With `transport` (for example a
    `GrpcTransport` serving real clients) and its `client_ids`, the federation runs over those
    instead; the config's data then gives only the server's test set, and the transport
    stays the caller's to close (one built here is closed here)."""
    from fedloom.report import Progress, human_bytes, rounds_table

    store_path = store_path.resolve()  # checkpoints and models are recorded by absolute path
    clients = prepared_clients(config)
    trainers, initial, evaluate = build_trainers(config.model, clients)
    ids = list(trainers) if client_ids is None else list(client_ids)
    strategy = build_strategy(config.strategy, len(ids))
    owned = transport is None
    if transport is None:
        transport = build_transport(config, trainers)
    progress = Progress(config.federation.rounds) if not quiet else None

    def on_round(result: RoundResult) -> None:
        if progress is not None:
            progress.update(result.record)

    with RunStore(store_path) as store:
        run_dir = store_path.parent / "runs"
        federation = Federation(
            strategy,
            transport,
            ids,
            config.federation,
            evaluate_fn=evaluate,
            store=store,
            run_dir=run_dir,
            on_round=on_round,
        )
        try:
            if resume is not None:
                result: RunResult = federation.resume(resume)
            else:
                result = federation.run(initial, name=config.name, config=config.to_dict())
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()
            print(
                f"run {federation.run_id} interrupted; continue it with "
                f"`{resume_hint.format(run_id=federation.run_id)}`",
                file=sys.stderr,
            )
            return 130
        finally:
            if owned:
                transport.close()
    history = result.history
    print(rounds_table(history))
    sent = sum(r.bytes_down for r in history)
    received = sum(r.bytes_up for r in history)
    final = history[-1].metrics if history else {}
    accuracy = f"{final['accuracy']:.4f}" if "accuracy" in final else "n/a"
    print(
        f"run {result.run_id}: {len(history)} rounds (stopped: {result.stopped}), "
        f"test accuracy {accuracy}, "
        f"sent {human_bytes(sent)}, received {human_bytes(received)}; model: {result.model_path}"
    )
    sys.stdout.flush()
    return 0
