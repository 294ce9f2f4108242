"""Adapters that turn user models into `Trainer`s: PyTorch, scikit-learn and NumPy.

Names are imported on first use, so `from fedloom.adapters import NumpyTrainer` does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedloom.adapters.numpy_trainer import (
        NumpyModel,
        NumpyTrainer,
        softmax_regression,
        softmax_regression_grad,
        softmax_regression_loss,
        softmax_regression_predict,
    )
    from fedloom.adapters.sklearn_trainer import SklearnTrainer
    from fedloom.adapters.torch_trainer import TorchTrainer, load_into_module, params_from_module

_WHERE = {
    "NumpyModel": "numpy_trainer",
    "NumpyTrainer": "numpy_trainer",
    "softmax_regression": "numpy_trainer",
    "softmax_regression_grad": "numpy_trainer",
    "softmax_regression_loss": "numpy_trainer",
    "softmax_regression_predict": "numpy_trainer",
    "SklearnTrainer": "sklearn_trainer",
    "TorchTrainer": "torch_trainer",
    "load_into_module": "torch_trainer",
    "params_from_module": "torch_trainer",
}

__all__ = [
    "NumpyModel",
    "NumpyTrainer",
    "SklearnTrainer",
    "TorchTrainer",
    "load_into_module",
    "params_from_module",
    "softmax_regression",
    "softmax_regression_grad",
    "softmax_regression_loss",
    "softmax_regression_predict",
]


def __getattr__(name: str) -> Any:
    """Import the adapter module that defines `name` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'fedloom.adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedloom.adapters.{_WHERE[name]}"), name)
