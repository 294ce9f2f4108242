"""A tiny NumPy trainer with controllable misbehaviour, shared by runtime tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

LAYOUT_ARRAYS = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}


def initial() -> Params:
    return Params.from_arrays(LAYOUT_ARRAYS)


@dataclass
class Toy:
    """Quadratic loss 0.5*||w - target||^2; SGD with seeded noise; `mode` misbehaves."""

    target: np.ndarray
    num_train_examples: int
    mode: str = "ok"

    def initial_params(self) -> Params:
        return initial()

    def fit(self, params: Params, config: FitConfig) -> Update:
        if self.mode == "raise":
            raise RuntimeError("disk on fire")
        if self.mode == "flaky":  # fails its first task only
            self.mode = "ok"
            raise RuntimeError("transient failure")
        rng = np.random.default_rng(config.seed)
        w = params.flat.astype(np.float64)
        steps = config.epochs * max(1, self.num_train_examples // config.batch_size)
        for _ in range(steps):
            grad = w - self.target + 0.01 * rng.normal(size=w.shape)
            grad += config.proximal_mu * (w - params.flat)
            if config.gradient_correction is not None:
                grad += config.gradient_correction.flat
            w -= config.learning_rate * grad
        delta = params.with_flat((w - params.flat).astype(np.float32))
        if self.mode == "nan":
            delta.flat[0] = np.nan
        if self.mode == "shape":
            delta = Params.from_arrays({"w": np.zeros(4), "b": np.zeros(1)})
        if self.mode == "dtype":
            delta = Params.from_arrays(dict(delta), np.float64)
        if self.mode == "names":
            delta = Params.from_arrays({"weight": np.zeros(3), "b": np.zeros(1)})
        loss = 0.5 * float(((w - self.target) ** 2).sum())
        return Update(delta, self.num_train_examples, steps, {"loss": loss})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        loss = 0.5 * float(((params.flat - self.target) ** 2).sum())
        return Evaluation(self.num_train_examples, {"loss": loss})


def federation_of(n: int, seed: int = 0, modes: dict[int, str] | None = None) -> dict[str, Toy]:
    rng = np.random.default_rng(seed)
    modes = modes or {}
    return {
        f"c{i:02d}": Toy(rng.normal(size=4), int(rng.integers(5, 50)), modes.get(i, "ok"))
        for i in range(n)
    }
