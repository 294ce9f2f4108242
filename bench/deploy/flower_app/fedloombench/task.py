"""The model and data both Flower apps share (no fedloom import: fedloom is not installed in
bench/.venv-flower).

`mnist_cnn()` is `fedloom.models.mnist_cnn()` layer for layer (same `state_dict` names, so the
initial weights `run.py` saved from fedloom's model load here unchanged). `load_shard(prep, k)`
reads client k's examples from the `.npy` files `run.py` prepared with fedloom's loaders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class Unflatten(nn.Module):
    """(n, 784) -> (n, 1, 28, 28), as fedloom's `_Unflatten`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 28, 28)


def mnist_cnn(num_classes: int = 10, fc: int = 512) -> nn.Sequential:
    """McMahan et al. 2017's CNN, 1,663,370 parameters (as `fedloom.models.mnist_cnn`)."""
    return nn.Sequential(
        Unflatten(),
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


def load_shard(prep: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client k's float32 images (n, 784) and int64 labels."""
    root = Path(prep)
    x = np.load(root / f"shard_{k}_x.npy")
    y = np.load(root / f"shard_{k}_y.npy").astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def load_initial(prep: str) -> dict[str, torch.Tensor]:
    """The initial weights, by `state_dict` name."""
    with np.load(Path(prep) / "initial.npz") as z:
        return {name: torch.from_numpy(z[name].copy()) for name in z.files}
