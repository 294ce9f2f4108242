"""Reference PyTorch models from the federated-learning literature (imports torch lazily)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """Fully connected ReLU network; `mlp(784, [200, 200], 10)` is McMahan et al.'s 2NN
    (199,210 parameters)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Unflatten(nn.Module):
    """(n, 784) -> (n, 1, 28, 28), so every model takes the loaders' flat images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 28, 28)


def mnist_cnn(num_classes: int = 10, fc: int = 512) -> nn.Sequential:
    """McMahan et al. 2017's CNN: two 5x5 convs (32, 64 channels) each followed by 2x2 max
    pooling, a fully connected layer of `fc` units, softmax output. With the defaults it has
    1,663,370 parameters; with `fc=2048, num_classes=62` it is LEAF's FEMNIST CNN."""
    return nn.Sequential(
        _Unflatten(),
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, fc),
        nn.ReLU(),
        nn.Linear(fc, num_classes),
    )


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: 8-d character embedding, stacked LSTM, next-char logits."""

    def __init__(self, vocab: int = 80, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, seq) int64 -> (n, vocab) logits for the character after each sequence."""
        out, _ = self.lstm(self.embed(x))
        logits: torch.Tensor = self.head(out[:, -1, :])
        return logits
