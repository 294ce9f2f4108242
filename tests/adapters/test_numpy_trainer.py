"""NumpyTrainer and softmax regression: gradients, exact FedProx/SCAFFOLD steps, learning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedloom.adapters.numpy_trainer import (
    NumpyModel,
    NumpyTrainer,
    softmax_regression,
    softmax_regression_grad,
    softmax_regression_loss,
)
from fedloom.core.params import Params, ParamsError
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, FitConfig


def problem(n: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)), rng.integers(0, 4, size=n)


def test_softmax_gradient_matches_finite_differences() -> None:
    x, y = problem()
    rng = np.random.default_rng(1)
    model = softmax_regression(5, 4, dtype=np.float64)
    params = model.init().with_flat(rng.normal(size=24))
    for l2 in (0.0, 0.3):
        loss, grad = softmax_regression_grad(params, x, y, l2)
        assert loss == pytest.approx(softmax_regression_loss(params, x, y, l2), rel=1e-12)
        numeric = np.empty(24)
        for i in range(24):
            bump = np.zeros(24)
            bump[i] = 1e-6
            up = softmax_regression_loss(params.with_flat(params.flat + bump), x, y, l2)
            down = softmax_regression_loss(params.with_flat(params.flat - bump), x, y, l2)
            numeric[i] = (up - down) / 2e-6
        np.testing.assert_allclose(grad.flat, numeric, rtol=1e-6, atol=1e-8)


def test_softmax_is_stable_for_huge_logits() -> None:
    x, y = problem()
    params = softmax_regression(5, 4).init()
    params["bias"][...] = [1e4, -1e4, 0, 3e4]
    loss, grad = softmax_regression_grad(params, x.astype(np.float32), y)
    assert np.isfinite(loss) and grad.is_finite()


@pytest.mark.parametrize(
    ("mu", "with_corr"), [(0.0, False), (0.5, False), (0.0, True), (0.2, True)]
)
def test_fit_matches_a_reference_loop(mu: float, with_corr: bool) -> None:
    x, y = problem()
    model = softmax_regression(5, 4, l2=0.01, dtype=np.float64)
    trainer = NumpyTrainer(model, (x, y))
    rng = np.random.default_rng(2)
    start = model.init().with_flat(rng.normal(size=24))
    corr = start.with_flat(rng.normal(size=24))
    cfg = FitConfig(round=1, epochs=3, batch_size=5, learning_rate=0.3, seed=9,
                    proximal_mu=mu, gradient_correction=corr if with_corr else None)  # fmt: skip
    update = trainer.fit(start, cfg)
    # reference: per-tensor textbook loop
    w = {k: v.copy() for k, v in start.items()}
    order_rng = np.random.default_rng(9)
    for _ in range(3):
        order = order_rng.permutation(len(y))
        for i in range(0, len(y), 5):
            b = order[i : i + 5]
            _, g = softmax_regression_grad(Params.from_arrays(w, np.float64), x[b], y[b], 0.01)
            for k in w:
                step = g[k] + mu * (w[k] - start[k]) + (corr[k] if with_corr else 0.0)
                w[k] = w[k] - 0.3 * step
    assert update.num_steps == 15 and update.num_examples == 23
    for k in w:
        np.testing.assert_allclose(start[k] + update.delta[k], w[k], rtol=1e-12, atol=1e-12)
    again = trainer.fit(start, cfg)
    assert again.delta.allclose(update.delta, rtol=0, atol=0)
    other_seed = dataclasses.replace(cfg, seed=10)
    assert not trainer.fit(start, other_seed).delta.allclose(update.delta)


def test_learns_digits() -> None:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    train, test = (x[:1200], y[:1200]), (x[1200:], y[1200:])
    trainer = NumpyTrainer(softmax_regression(64, 10, l2=1e-4), train, test)
    assert isinstance(trainer, Trainer) and trainer.num_train_examples == 1200
    params = trainer.initial_params()
    for r in range(8):
        update = trainer.fit(params, FitConfig(round=r, batch_size=32, learning_rate=0.5, seed=r))
        params = params + update.delta
    ev = trainer.evaluate(params, EvalConfig(round=8, batch_size=100))
    assert ev.num_examples == len(y) - 1200
    assert ev.metrics["accuracy"] > 0.9
    assert 0 < ev.metrics["loss"] < update.metrics["train_loss"] * 2


def test_custom_model_without_predict_and_errors() -> None:
    # least squares on one weight vector: loss from loss_and_grad, no accuracy
    def init() -> Params:
        return Params.from_arrays({"w": np.zeros(3)}, np.float64)

    def loss_and_grad(p: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        r = x @ p["w"] - y
        return float(np.mean(r**2)), p.with_flat(2 * x.T @ r / len(y))

    x = np.random.default_rng(0).normal(size=(50, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    trainer = NumpyTrainer(NumpyModel(init, loss_and_grad), (x, y), (x, y))
    params = init()
    for r in range(20):
        params = params + trainer.fit(params, FitConfig(round=r, learning_rate=0.1)).delta
    ev = trainer.evaluate(params, EvalConfig(round=1))
    assert set(ev.metrics) == {"loss"} and ev.metrics["loss"] < 1e-6
    with pytest.raises(ParamsError, match="gradient_correction"):
        bad = Params.from_arrays({"v": np.zeros(3)}, np.float64)
        trainer.fit(params, FitConfig(round=1, gradient_correction=bad))
    with pytest.raises(ValueError, match="test data"):
        NumpyTrainer(NumpyModel(init, loss_and_grad), (x, y)).evaluate(params, EvalConfig(1))
    with pytest.raises(ValueError, match="inputs"):
        NumpyTrainer(NumpyModel(init, loss_and_grad), (x, y[:3]))
