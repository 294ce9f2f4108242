"""scikit-learn adapter: linear models (`SGDClassifier`, `LogisticRegression`) as a `Trainer`.

Parameters are `coef` (n_classes or 1, n_features) and `intercept` (n_classes or 1). Local
training: `SGDClassifier` runs `partial_fit` over seeded minibatches for `config.epochs`
passes with a constant step `config.learning_rate`; `LogisticRegression` is warm-started from
the global model with `max_iter = config.epochs`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update


class SklearnTrainer:
    """A `Trainer` around a linear scikit-learn classifier (the estimator is reused in place).

    `classes` lists every label of the federation: a client may hold only some of them.
    FedProx and SCAFFOLD need gradient access scikit-learn does not give: configs asking for
    them raise `NotImplementedError`.
    """

    def __init__(
        self,
        estimator: Any,
        train: tuple[npt.ArrayLike, npt.ArrayLike],
        test: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
        *,
        classes: npt.ArrayLike,
    ) -> None:
        if not hasattr(estimator, "partial_fit") and not hasattr(estimator, "warm_start"):
            raise TypeError(f"{type(estimator).__name__} has neither partial_fit nor warm_start")
        self.estimator = estimator
        self.x, self.y = np.asarray(train[0], dtype=np.float64), np.asarray(train[1])
        self.test = None if test is None else (np.asarray(test[0], np.float64), np.asarray(test[1]))
        self.classes = np.asarray(classes)
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        self._shapes = {"coef": (rows, self.x.shape[1]), "intercept": (rows,)}

    @property
    def num_train_examples(self) -> int:
        """Size of the local training set."""
        return len(self.y)

    def initial_params(self) -> Params:
        """All-zero coefficients and intercepts."""
        return Params.from_arrays({k: np.zeros(s) for k, s in self._shapes.items()})

    def _load(self, params: Params) -> None:
        est = self.estimator
        est.coef_ = params["coef"].astype(np.float64)
        est.intercept_ = params["intercept"].astype(np.float64)
        est.classes_ = self.classes
        est.n_features_in_ = self.x.shape[1]

    def fit(self, params: Params, config: FitConfig) -> Update:
        """Local training from `params`; returns the delta."""
        if config.proximal_mu or config.gradient_correction is not None:
            raise NotImplementedError(
                "FedProx and SCAFFOLD need per-step gradients, which scikit-learn estimators do "
                "not expose; use TorchTrainer or NumpyTrainer for these algorithms"
            )
        est = self.estimator
        self._load(params)
        rng = np.random.default_rng(config.seed)
        steps = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter from tiny local fits
            if hasattr(est, "partial_fit"):
                est.set_params(learning_rate="constant", eta0=config.learning_rate, random_state=0)
                for _ in range(config.epochs):
                    order = rng.permutation(len(self.y))
                    for i in range(0, len(order), config.batch_size):
                        batch = order[i : i + config.batch_size]
                        est.partial_fit(self.x[batch], self.y[batch], classes=self.classes)
                        steps += 1
            else:
                est.set_params(warm_start=True, max_iter=config.epochs)
                est.fit(self.x, self.y)
                steps = config.epochs
        trained = Params.from_arrays({"coef": est.coef_, "intercept": est.intercept_})
        if trained.layout != params.layout:
            raise ValueError(
                f"estimator produced {trained!r}, expected {params!r}: does this client hold "
                "examples of only one class? LogisticRegression needs two"
            )
        return Update(trained - params, len(self.y), steps, {})

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Accuracy (and log-loss where the estimator gives probabilities) on the test data."""
        if self.test is None:
            raise ValueError("this trainer has no test data to evaluate on")
        self._load(params)
        x, y = self.test
        metrics = {"accuracy": float(np.mean(self.estimator.predict(x) == y))}
        if hasattr(self.estimator, "predict_proba"):
            from sklearn.metrics import log_loss

            proba = self.estimator.predict_proba(x)
            metrics["loss"] = float(log_loss(y, proba, labels=self.classes))
        return Evaluation(len(y), metrics)
