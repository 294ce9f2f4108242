"""Learning quality on real MNIST with fixed seeds (McMahan et al. 2017's 2NN)."""

import pytest
import torch
from harness import mcmahan_clients, train

from fedloom import FedAvg, Settings
from fedloom.models import mlp


@pytest.mark.slow
def test_mnist_2nn_iid_reaches_97_percent() -> None:
    """E=1, B=10, C=0.1 over 100 IID clients; McMahan et al. report 87 rounds (Table 1)."""
    torch.manual_seed(0)
    clients, server = mcmahan_clients(mlp(784, [200, 200], 10), "iid")
    settings = Settings(
        rounds=150,
        fraction_fit=0.1,
        epochs=1,
        batch_size=10,
        learning_rate=0.1,
        seed=0,
        target_metric="accuracy",
        target_value=0.97,
    )
    result, _ = train(FedAvg(), clients, server, settings)
    accuracy = result.metric("accuracy")
    print(f"rounds to 97%: {len(accuracy)}")
    assert result.stopped == "target", f"stalled at {max(accuracy):.4f} after 150 rounds"
    assert len(accuracy) <= 87  # the paper needed 87 (Table 1); we measured 62
