"""NumPy adapter: mini-batch SGD over user functions, plus ready-made softmax regression.

A `NumpyModel` is three plain functions (`init`, `loss_and_grad`, `predict`) and optionally an
evaluation `loss`; `NumpyTrainer` runs the local SGD loop on them, including FedProx's proximal
term and SCAFFOLD's gradient correction, exactly as `TorchTrainer` does:
`g = grad + mu * (w - w_global) + correction`, then `w -= lr * g`.

`softmax_regression(...)` is multinomial logistic regression with optional L2 (the embedded
default federation uses it); its pieces are public functions as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.params import FloatArray, Params, ParamsError
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

Array = npt.NDArray[Any]
#: `loss_and_grad(params, x, y) -> (mean loss over the batch, gradient in params' layout)`.
GradFn = Callable[[Params, Array, Array], tuple[float, Params]]
#: `predict(params, x) -> scores (n, n_classes)` (argmax is the label) or labels (n,).
PredictFn = Callable[[Params, Array], Array]
#: `loss(params, x, y) -> mean loss over the examples`.
LossFn = Callable[[Params, Array, Array], float]


@dataclass(frozen=True)
class NumpyModel:
    """A model as plain functions of `Params`.

    - `init()` returns the starting parameters;
    - `loss_and_grad(params, x, y)` returns the mean loss over the batch and its gradient, a
      `Params` in the layout of `params`. `params` may be a view of the trainer's working
      buffer: read it, never keep or modify it;
    - `predict(params, x)` (optional) returns class scores (n, n_classes) or labels (n,);
      with it, evaluation reports `accuracy`;
    - `loss(params, x, y)` (optional) is the evaluation loss; without it evaluation uses the
      loss from `loss_and_grad` (correct, but it computes a gradient it does not need).
    """

    init: Callable[[], Params]
    loss_and_grad: GradFn
    predict: PredictFn | None = None
    loss: LossFn | None = None


def _split(data: tuple[npt.ArrayLike, npt.ArrayLike], what: str) -> tuple[Array, Array]:
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"{what} data: {len(x)} inputs and {len(y)} targets (need >0, equal)")
    return x, y


class NumpyTrainer:
    """A `Trainer` running plain mini-batch SGD on a `NumpyModel`.

    Args:
        model: the functions to train.
        train: `(x, y)` arrays with one example per row.
        test: optional `(x, y)` for `evaluate`.

    Every epoch visits the data in the order `np.random.default_rng(config.seed)
    .permutation(n)` (one generator per `fit`, one permutation per epoch), in batches of
    `config.batch_size` (the last may be smaller).
    """

    def __init__(
        self,
        model: NumpyModel,
        train: tuple[npt.ArrayLike, npt.ArrayLike],
        test: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    ) -> None:
        self.model = model
        self.x, self.y = _split(train, "train")
        self.test = None if test is None else _split(test, "test")

    @property
    def num_train_examples(self) -> int:
        """Size of the local training set (the `num_examples` of every `Update`)."""
        return len(self.y)

    def initial_params(self) -> Params:
        """`model.init()`."""
        return self.model.init()

    def fit(self, params: Params, config: FitConfig) -> Update:
        """Run `config.epochs` epochs of SGD from `params`; return the delta in its layout.

        `metrics["train_loss"]` is the mean per-example loss over the last epoch's batches.
        """
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        x, y = self.x, self.y
        n, batch, lr, mu = len(y), config.batch_size, config.learning_rate, config.proximal_mu
        w: FloatArray = params.flat.copy()
        current = params.with_flat(w)
        corr = config.gradient_correction
        if corr is not None:
            _check(params, corr, "gradient_correction")
        rng = np.random.default_rng(config.seed)
        steps, loss_sum = 0, 0.0
        for epoch in range(config.epochs):
            order = rng.permutation(n)
            last = epoch == config.epochs - 1
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                loss, grad = self.model.loss_and_grad(current, x[idx], y[idx])
                if grad.layout is not params.layout:
                    _check(params, grad, "the gradient")
                step = grad.flat + mu * (w - params.flat) if mu > 0 else grad.flat.copy()
                if corr is not None:
                    step += corr.flat
                w -= lr * step
                steps += 1
                if last:
                    loss_sum += float(loss) * len(idx)
        metrics = {"train_loss": loss_sum / n} if steps else {}
        return Update(params.with_flat(w - params.flat), n, steps, metrics)

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Mean `loss` (and `accuracy` if the model can predict) on the test data, in batches.

        Raises `ValueError` if the trainer was built without test data.
        """
        if self.test is None:
            raise ValueError("NumpyTrainer.evaluate needs test data: pass test=(x, y)")
        x, y = self.test
        model, size = self.model, max(1, config.batch_size)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), size):
            xb, yb = x[start : start + size], y[start : start + size]
            if model.loss is not None:
                loss_sum += float(model.loss(params, xb, yb)) * len(yb)
            else:
                loss_sum += float(model.loss_and_grad(params, xb, yb)[0]) * len(yb)
            if model.predict is not None:
                out = np.asarray(model.predict(params, xb))
                labels = out.argmax(axis=-1) if out.ndim == 2 else out
                correct += int((labels == yb).sum())
        metrics = {"loss": loss_sum / len(y)}
        if model.predict is not None:
            metrics["accuracy"] = correct / len(y)
        return Evaluation(len(y), metrics)


def _check(params: Params, other: Params, what: str) -> None:
    reason = params.layout.describe_mismatch(other.layout)
    if reason is not None:
        raise ParamsError(f"{what} does not match the model: {reason}")


# -- multinomial logistic (softmax) regression ---------------------------------------------------


def softmax_regression_predict(params: Params, x: Array) -> Array:
    """Logits `x @ weight.T + bias`, shape (n, n_classes); argmax is the predicted class."""
    return np.asarray(x @ params["weight"].T + params["bias"])


def _log_softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=1, keepdims=True)  # stable: the largest logit is 0
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))


def _l2_term(params: Params, l2: float) -> float:
    return 0.5 * l2 * float(np.sum(params["weight"].astype(np.float64) ** 2)) if l2 else 0.0


def softmax_regression_loss(params: Params, x: Array, y: Array, l2: float = 0.0) -> float:
    """Mean cross-entropy of integer labels `y` plus `l2 / 2 * ||weight||^2`."""
    logp = _log_softmax(softmax_regression_predict(params, x))
    return -float(logp[np.arange(len(y)), y].mean()) + _l2_term(params, l2)


def softmax_regression_grad(
    params: Params, x: Array, y: Array, l2: float = 0.0
) -> tuple[float, Params]:
    """`softmax_regression_loss` and its exact gradient, in `params`' layout."""
    logp = _log_softmax(softmax_regression_predict(params, x))
    rows = np.arange(len(y))
    loss = -float(logp[rows, y].mean()) + _l2_term(params, l2)
    err = np.exp(logp)  # softmax probabilities
    err[rows, y] -= 1.0
    err /= len(y)
    grad = Params.zeros(params.layout)
    grad_w = grad["weight"]
    grad_w[...] = err.T @ x
    if l2:
        grad_w += l2 * params["weight"]
    grad["bias"][...] = err.sum(axis=0)
    return loss, grad


def softmax_regression(
    n_features: int, n_classes: int, *, l2: float = 0.0, dtype: npt.DTypeLike = np.float32
) -> NumpyModel:
    """Multinomial logistic regression, zero-initialised: scores = x @ weight.T + bias.

    Parameters are `weight` (n_classes, n_features) and `bias` (n_classes,); labels are
    integers in [0, n_classes). The training loss is mean cross-entropy plus
    `l2`/2 * ||weight||^2; the evaluation loss is the plain cross-entropy.
    """
    if n_features < 1 or n_classes < 2:
        raise ValueError(f"need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}")

    def init() -> Params:
        arrays = {"weight": np.zeros((n_classes, n_features)), "bias": np.zeros(n_classes)}
        return Params.from_arrays(arrays, dtype)

    return NumpyModel(
        init,
        partial(softmax_regression_grad, l2=l2),
        softmax_regression_predict,
        softmax_regression_loss,
    )
