"""NumPy adapter: minibatch SGD over plain NumPy functions, and a ready softmax regression."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

Array = npt.NDArray[np.floating]
Labels = npt.NDArray[np.integer]


@dataclass(frozen=True)
class NumpyModel:
    """A model as three pure functions.

    - `init()` returns the starting parameters;
    - `loss_and_grad(params, x, y)` returns the mean loss over the batch and its gradient
      (a `Params` in the same layout);
    - `predict(params, x)` returns class scores of shape (n, classes).
    """

    init: Callable[[], Params]
    loss_and_grad: Callable[[Params, Array, Labels], tuple[float, Params]]
    predict: Callable[[Params, Array], Array]


class NumpyTrainer:
    """A `Trainer` doing minibatch SGD with `model`'s gradient on local data.

    Each step adds FedProx's mu * (w - w_global) and SCAFFOLD's gradient correction to the
    model gradient when the config asks for them. Shuffling is seeded by `config.seed`.
    """

    def __init__(
        self,
        model: NumpyModel,
        train: tuple[npt.ArrayLike, npt.ArrayLike],
        test: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    ) -> None:
        self.model = model
        self.x, self.y = np.asarray(train[0]), np.asarray(train[1])
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ValueError(f"train data: {len(self.x)} inputs and {len(self.y)} labels")
        self.test = None if test is None else (np.asarray(test[0]), np.asarray(test[1]))

    @property
    def num_train_examples(self) -> int:
        """Size of the local training set."""
        return len(self.y)

    def initial_params(self) -> Params:
        """`model.init()`."""
        return self.model.init()

    def fit(self, params: Params, config: FitConfig) -> Update:
        """`config.epochs` passes of minibatch SGD from `params`; returns the delta."""
        rng = np.random.default_rng(config.seed)
        start = params.flat
        current = params.copy()
        w = current.flat
        n, steps, last_losses = len(self.y), 0, []
        for epoch in range(config.epochs):
            order = rng.permutation(n)
            losses = []
            for i in range(0, n, config.batch_size):
                batch = order[i : i + config.batch_size]
                loss, grad = self.model.loss_and_grad(current, self.x[batch], self.y[batch])
                g = grad.flat
                if config.proximal_mu:
                    g = g + config.proximal_mu * (w - start)
                if config.gradient_correction is not None:
                    g = g + config.gradient_correction.flat
                w -= config.learning_rate * g
                losses.append(loss)
                steps += 1
            if epoch == config.epochs - 1:
                last_losses = losses
        delta = params.with_flat((w - start).astype(params.layout.dtype))
        return Update(delta, n, steps, {"loss": float(np.mean(last_losses))})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Accuracy and mean cross-entropy on the test data (`ValueError` if there is none)."""
        if self.test is None:
            raise ValueError("this trainer has no test data to evaluate on")
        x, y = self.test
        scores = self.model.predict(params, x)
        return Evaluation(
            len(y), {"accuracy": accuracy(scores, y), "loss": cross_entropy(scores, y)}
        )


def accuracy(scores: Array, y: Labels) -> float:
    """Share of rows whose highest score is the label."""
    return float(np.mean(np.argmax(scores, axis=1) == y))


def cross_entropy(scores: Array, y: Labels) -> float:
    """Mean softmax cross-entropy of class scores (logits)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(y)), y]))


def softmax_regression(
    n_features: int, n_classes: int, *, l2: float = 0.0, dtype: npt.DTypeLike = np.float32
) -> NumpyModel:
    """Multinomial logistic regression: scores = x @ weight.T + bias, zero-initialised.

    Parameters are `weight` (n_classes, n_features) and `bias` (n_classes,); the loss is mean
    cross-entropy plus `l2`/2 * ||weight||^2.
    """

    def init() -> Params:
        return Params.from_arrays(
            {"weight": np.zeros((n_classes, n_features)), "bias": np.zeros(n_classes)}, dtype
        )

    def predict(params: Params, x: Array) -> Array:
        scores: Array = x @ params["weight"].T + params["bias"]
        return scores

    def loss_and_grad(params: Params, x: Array, y: Labels) -> tuple[float, Params]:
        scores = predict(params, x)
        shifted = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        prob = exp / exp.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(np.mean(-np.log(prob[rows, y] + 1e-12)))
        prob[rows, y] -= 1.0
        prob /= len(y)
        grad = Params.zeros(params.layout)
        grad["weight"][...] = prob.T @ x + l2 * params["weight"]
        grad["bias"][...] = prob.sum(axis=0)
        if l2:
            loss += 0.5 * l2 * float(np.sum(params["weight"] ** 2))
        return loss, grad

    return NumpyModel(init, loss_and_grad, predict)
