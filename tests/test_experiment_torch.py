"""Config-driven runs on the real datasets (short, fixed seeds), and the reference models."""

from dataclasses import replace

import torch

from fedloom.config import parse_config
from fedloom.experiment import build_strategy, build_trainers, load_clients, prepared_clients
from fedloom.runtime.federation import Federation


def run(raw: dict[str, dict[str, object]]) -> list[dict[str, float]]:
    config = parse_config(raw)
    clients = prepared_clients(config)
    trainers, initial, evaluate = build_trainers(config.model, clients)
    strategy = build_strategy(config.strategy, len(trainers))
    with Federation.simulation(strategy, trainers, config.federation, evaluate_fn=evaluate) as f:
        return [r.metrics for r in f.run(initial).history]


def test_femnist_by_writer_learns() -> None:
    history = run(
        {
            "data": {"dataset": "femnist", "partition": "natural", "max_clients": 30},
            "model": {"kind": "logistic"},
            "federation": {
                "rounds": 6,
                "fraction_fit": 0.5,
                "epochs": 2,
                "batch_size": 10,
                "learning_rate": 0.05,
                "fraction_evaluate": 0.3,
            },
        }
    )
    # 62 classes: chance is 1.6%; a few rounds over 30 writers get well past it
    assert history[-1]["accuracy"] > 0.3
    assert "federated_accuracy" in history[-1]


def test_mnist_2nn_from_config() -> None:
    history = run(
        {
            "data": {"dataset": "mnist", "partition": "iid", "num_clients": 100},
            "model": {"kind": "mlp", "hidden": [200, 200]},
            "federation": {"rounds": 3, "fraction_fit": 0.1, "learning_rate": 0.1},
        }
    )
    assert history[-1]["accuracy"] > 0.8


def test_shakespeare_lstm_from_config_trains() -> None:
    """Integer character windows reach the LSTM's embedding as indices (not floats)."""
    raw: dict[str, dict[str, object]] = {
        "data": {"dataset": "shakespeare", "partition": "natural", "max_clients": 2},
        "model": {"kind": "lstm"},
        "federation": {"rounds": 1, "fraction_fit": 1.0, "batch_size": 32, "epochs": 1},
    }
    clients = load_clients(parse_config(raw).data, 0)
    for cid, (train, test) in list(clients.parts.items()):  # keep the test quick
        clients.parts[cid] = (train.subset(range(64)), test.subset(range(min(32, len(test)))))
    clients = replace(clients, test=clients.test.subset(range(64)))
    config = parse_config(raw)
    trainers, initial, evaluate = build_trainers(config.model, clients)
    strategy = build_strategy(config.strategy, len(trainers))
    with Federation.simulation(strategy, trainers, config.federation, evaluate_fn=evaluate) as f:
        (record,) = f.run(initial).history
    assert record.rejections == () and record.num_accepted == 2
    assert 0 < record.metrics["train_loss"] < 10  # about ln(80) = 4.4 at the start


def test_reference_models_have_the_published_sizes() -> None:
    from fedloom import models

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(models.mnist_cnn()) == 1_663_370  # McMahan et al. 2017
    assert count(models.mlp(784, [200, 200], 10)) == 199_210  # the 2NN
    logits = models.CharLSTM()(torch.zeros(3, 80, dtype=torch.long))
    assert logits.shape == (3, 80)
    assert models.mnist_cnn(62, fc=2048)(torch.zeros(2, 784)).shape == (2, 62)
