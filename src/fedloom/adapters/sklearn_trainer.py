"""scikit-learn adapter: linear models (`SGDClassifier`, `SGDRegressor`, `LogisticRegression`).

Parameters are `coef` and `intercept`: for a classifier over `classes`, coef is
(1, n_features) with two classes and (n_classes, n_features) otherwise, intercept (1,) or
(n_classes,); for a regressor, coef is (n_features,) and intercept (1,).

Local training, from the global model every time (the estimator object is reused in place):

- estimators with `partial_fit` (`SGDClassifier`, `SGDRegressor`): `config.epochs` calls of
  `partial_fit`, each over the client's data in the order
  `np.random.default_rng(config.seed).permutation(n)` (one permutation per epoch). The
  estimator is set to `learning_rate="constant"`, `eta0=config.learning_rate`,
  `shuffle=False` (the order above is the shuffle) and `random_state=config.seed`. scikit-learn's
  SGD updates once per example, so `config.batch_size` does not change the result, and
  `num_steps` counts per-example updates;
- `LogisticRegression` (no `partial_fit`): `fit` with `warm_start=True` and
  `max_iter=config.epochs` on all local data; `config.learning_rate` does not apply. Classes a
  client lacks are added as zero-weight rows so every client produces the same shapes.

FedProx and SCAFFOLD need per-step gradients that scikit-learn does not expose: configs asking
for them raise `NotImplementedError`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.base import is_classifier
from sklearn.metrics import log_loss

from fedloom.core.params import Params, ParamsError
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

Array = npt.NDArray[Any]


class SklearnTrainer:
    """A `Trainer` around a linear scikit-learn estimator with `coef_` and `intercept_`.

    Args:
        estimator: an unfitted or fitted `SGDClassifier`, `SGDRegressor` or
            `LogisticRegression` (or a look-alike); it is modified in place by every call.
        train: `(x, y)`; x becomes float64 (n, n_features).
        test: optional `(x, y)` for `evaluate`.
        classes: every label of the federation (a client may hold only some of them);
            required for classifiers, must be None for regressors.
    """

    def __init__(
        self,
        estimator: Any,
        train: tuple[npt.ArrayLike, npt.ArrayLike],
        test: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
        *,
        classes: npt.ArrayLike | None = None,
    ) -> None:
        if not hasattr(estimator, "partial_fit") and not hasattr(estimator, "warm_start"):
            raise TypeError(f"{type(estimator).__name__} has neither partial_fit nor warm_start")
        hyper = estimator.get_params()
        if hyper.get("average"):
            raise ValueError("averaged SGD (average=True) is not supported: its state is hidden")
        if hyper.get("solver") == "liblinear":
            raise ValueError("the liblinear solver cannot warm-start; use lbfgs (the default)")
        self.estimator = estimator
        self.x, self.y = self._data(train, "train")
        self.test = None if test is None else self._data(test, "test")
        self.classifier = bool(is_classifier(estimator))
        n_features = self.x.shape[1]
        if self.classifier:
            if classes is None:
                raise ValueError(f"{type(estimator).__name__} is a classifier: pass classes=")
            self.classes: Array | None = np.unique(np.asarray(classes))
            if len(self.classes) < 2:
                raise ValueError("classes must hold at least two labels")
            rows = 1 if len(self.classes) == 2 else len(self.classes)
            self._shapes = {"coef": (rows, n_features), "intercept": (rows,)}
        else:
            if classes is not None:
                raise ValueError(f"{type(estimator).__name__} is a regressor: classes must be None")
            self.classes = None
            self._shapes = {"coef": (n_features,), "intercept": (1,)}

    @staticmethod
    def _data(data: tuple[npt.ArrayLike, npt.ArrayLike], what: str) -> tuple[Array, Array]:
        x, y = np.asarray(data[0], dtype=np.float64), np.asarray(data[1])
        if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
            raise ValueError(f"{what} data: x {x.shape} must be (n>0, features), y of length n")
        return x, y

    @property
    def num_train_examples(self) -> int:
        """Size of the local training set (the `num_examples` of every `Update`)."""
        return len(self.y)

    def initial_params(self) -> Params:
        """All-zero `coef` and `intercept` (float32) in the shapes described by the module."""
        return Params.from_arrays({k: np.zeros(s) for k, s in self._shapes.items()})

    def _load(self, params: Params) -> None:
        expected = self.initial_params().layout
        if params.layout.specs != expected.specs:
            theirs = type(expected)(params.layout.specs, expected.dtype)
            raise ParamsError(
                f"params do not fit the estimator: {expected.describe_mismatch(theirs)}"
            )
        est = self.estimator
        est.coef_ = np.array(params["coef"], dtype=np.float64)  # fresh, writable, C-ordered
        est.intercept_ = np.array(params["intercept"], dtype=np.float64)
        est.n_features_in_ = self.x.shape[1]
        est.t_ = 1.0
        if self.classes is not None:
            est.classes_ = self.classes

    def fit(self, params: Params, config: FitConfig) -> Update:
        """Train locally from `params` as the module docstring says; return the delta.

        Raises `NotImplementedError` for FedProx (`proximal_mu` > 0) and SCAFFOLD
        (`gradient_correction` set).
        """
        if config.proximal_mu or config.gradient_correction is not None:
            algorithm = "FedProx" if config.proximal_mu else "SCAFFOLD"
            raise NotImplementedError(
                f"{algorithm} needs per-step gradients, which scikit-learn estimators do not "
                "expose; use TorchTrainer or NumpyTrainer for it"
            )
        est, x, y = self.estimator, self.x, self.y
        self._load(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter from short local fits
            if hasattr(est, "partial_fit"):
                wanted = {"learning_rate": "constant", "eta0": config.learning_rate,
                          "shuffle": False, "random_state": config.seed}  # fmt: skip
                hyper = est.get_params()
                est.set_params(**{k: v for k, v in wanted.items() if k in hyper})
                rng = np.random.default_rng(config.seed)
                for _ in range(config.epochs):
                    order = rng.permutation(len(y))
                    if self.classes is not None:
                        est.partial_fit(x[order], y[order], classes=self.classes)
                    else:
                        est.partial_fit(x[order], y[order])
                steps = config.epochs * len(y)
            else:
                assert self.classes is not None
                missing = np.setdiff1d(self.classes, y)  # zero-weight rows keep all classes
                xs = np.concatenate([x, np.zeros((len(missing), x.shape[1]))])
                ys = np.concatenate([y, missing.astype(y.dtype)])
                weights = np.concatenate([np.ones(len(y)), np.zeros(len(missing))])
                est.set_params(warm_start=True, max_iter=config.epochs)
                est.fit(xs, ys, sample_weight=weights)
                steps = int(np.max(getattr(est, "n_iter_", config.epochs)))
        trained = []
        for name, shape in self._shapes.items():
            value = np.asarray(getattr(est, f"{name}_"))
            if value.shape != shape:
                raise ValueError(f"estimator's {name}_ has shape {value.shape}, expected {shape}")
            trained.append(value.ravel())
        delta = np.concatenate(trained).astype(params.layout.dtype) - params.flat
        return Update(params.with_flat(delta), len(y), steps, {})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Score `params` on the test data.

        Classifiers: `accuracy`, and `loss` (log-loss over `classes`) if the estimator has
        `predict_proba` (for `SGDClassifier`, only with `loss="log_loss"` or
        `"modified_huber"`). Regressors: `loss` (mean squared error).
        Raises `ValueError` if the trainer was built without test data.
        """
        if self.test is None:
            raise ValueError("SklearnTrainer.evaluate needs test data: pass test=(x, y)")
        self._load(params)
        est, (x, y) = self.estimator, self.test
        pred = est.predict(x)
        if self.classes is None:
            return Evaluation(len(y), {"loss": float(np.mean((pred - y) ** 2))})
        metrics = {"accuracy": float(np.mean(pred == y))}
        if hasattr(est, "predict_proba"):
            metrics["loss"] = float(log_loss(y, est.predict_proba(x), labels=self.classes))
        return Evaluation(len(y), metrics)
