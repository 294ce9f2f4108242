"""The embedded default federation, end to end through the config and experiment builder."""

import tomllib

import numpy as np

from fedloom.adapters import NumpyTrainer, softmax_regression
from fedloom.cli import default_config_text
from fedloom.config import parse_config
from fedloom.core import EvalConfig, FitConfig
from fedloom.experiment import build_strategy, build_trainers, load_clients, standardize
from fedloom.runtime.federation import Federation


def test_default_federation_matches_a_centrally_trained_model_within_2_points() -> None:
    config = parse_config(tomllib.loads(default_config_text()))
    clients = standardize(load_clients(config.data, config.federation.seed))
    # the split really is skewed: some hospital's label share is far from the pooled one
    shares = [float(np.mean(tr.y)) for tr, _ in clients.parts.values()]
    assert max(shares) - min(shares) > 0.3

    trainers, initial, evaluate = build_trainers(config.model, clients)
    strategy = build_strategy(config.strategy, len(trainers))
    with Federation.simulation(strategy, trainers, config.federation, evaluate_fn=evaluate) as fed:
        federated = fed.run(initial).history[-1].metrics["accuracy"]

    # the same kind of model trained on the pooled data (what no hospital may do in practice)
    x = np.concatenate([tr.x for tr, _ in clients.parts.values()])
    y = np.concatenate([tr.y for tr, _ in clients.parts.values()])
    central = NumpyTrainer(
        softmax_regression(x.shape[1], 2), (x, y), (clients.test.x, clients.test.y)
    )
    update = central.fit(initial, FitConfig(round=1, epochs=40, batch_size=16, learning_rate=0.1))
    central_acc = central.evaluate(initial + update.delta, EvalConfig(1)).metrics["accuracy"]
    assert central_acc > 0.93
    assert federated >= central_acc - 0.02, (federated, central_acc)


def test_every_strategy_builds_and_learns_on_digits() -> None:
    raw = tomllib.loads(default_config_text())
    raw["data"].update(dataset="digits", num_clients=10, partition="iid")
    raw["federation"].update(rounds=5, fraction_fit=0.5, min_fit_clients=2)
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"):
        raw["strategy"] = {"name": name}
        if name in ("fedadam", "fedyogi", "fedadagrad"):
            raw["strategy"]["server_lr"] = 0.05
        config = parse_config(raw)
        clients = standardize(load_clients(config.data, 0))
        trainers, initial, evaluate = build_trainers(config.model, clients)
        strategy = build_strategy(config.strategy, len(trainers))
        with Federation.simulation(
            strategy, trainers, config.federation, evaluate_fn=evaluate
        ) as f:
            accuracy = f.run(initial).history[-1].metrics["accuracy"]
        assert accuracy > 0.8, (name, accuracy)
