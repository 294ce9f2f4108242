"""SklearnTrainer: warm starts from the global model, learns, refuses FedProx/SCAFFOLD."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.preprocessing import StandardScaler

from fedloom.adapters.sklearn_trainer import SklearnTrainer
from fedloom.core.params import Params, ParamsError
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, FitConfig

X, Y = load_breast_cancer(return_X_y=True)
X = StandardScaler().fit_transform(X)
TRAIN, TEST = (X[:400], Y[:400]), (X[400:], Y[400:])


@pytest.mark.parametrize("make", [lambda: SGDClassifier(loss="log_loss"), LogisticRegression])
def test_learns_breast_cancer_over_a_few_rounds(make: type) -> None:
    # two clients with halves of the training data, averaged FedAvg-style
    clients = [
        SklearnTrainer(make(), (X[i:400:2], Y[i:400:2]), TEST, classes=[0, 1]) for i in (0, 1)
    ]
    params = clients[0].initial_params()
    assert list(params) == ["coef", "intercept"] and params["coef"].shape == (1, 30)
    assert isinstance(clients[0], Trainer)
    for r in range(3):
        deltas = [c.fit(params, FitConfig(round=r, epochs=2, seed=r)).delta for c in clients]
        params = params + (deltas[0] + deltas[1]) * 0.5
    ev = clients[0].evaluate(params, EvalConfig(round=3))
    assert ev.num_examples == len(TEST[1])
    assert ev.metrics["accuracy"] > 0.9 and ev.metrics["loss"] < 0.3


def test_sgd_fit_starts_from_params_and_matches_sklearn() -> None:
    trainer = SklearnTrainer(SGDClassifier(loss="log_loss", alpha=1e-3), TRAIN, classes=[0, 1])
    rng = np.random.default_rng(0)
    start = Params.from_arrays({"coef": rng.normal(size=(1, 30)), "intercept": [0.3]})
    update = trainer.fit(start, FitConfig(round=1, epochs=1, learning_rate=0.02, seed=5))
    assert update.num_steps == 400 and update.num_examples == 400
    perm = np.random.default_rng(5).permutation(400)
    ref = SGDClassifier(loss="log_loss", alpha=1e-3, learning_rate="constant", eta0=0.02,
                        shuffle=False, max_iter=1, tol=None)  # fmt: skip
    ref.fit(
        X[:400][perm], Y[:400][perm], coef_init=start["coef"], intercept_init=start["intercept"]
    )
    trained = start + update.delta
    np.testing.assert_allclose(trained["coef"], ref.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained["intercept"], ref.intercept_, rtol=1e-5, atol=1e-6)
    again = trainer.fit(start, FitConfig(round=1, epochs=1, learning_rate=0.02, seed=5))
    assert again.delta.allclose(update.delta, rtol=0, atol=0)


def test_clients_missing_classes_keep_the_federation_shapes() -> None:
    x, y = load_iris(return_X_y=True)
    for est in (SGDClassifier(loss="log_loss"), LogisticRegression()):
        trainer = SklearnTrainer(est, (x[y < 2], y[y < 2]), (x, y), classes=[0, 1, 2])
        params = trainer.initial_params()
        assert params["coef"].shape == (3, 4)
        update = trainer.fit(params, FitConfig(round=1, epochs=3))
        assert update.delta.layout == params.layout and update.delta.norm() > 0
        assert set(trainer.evaluate(params + update.delta, EvalConfig(round=1)).metrics) == {
            "accuracy",
            "loss",
        }


def test_fedprox_and_scaffold_are_refused() -> None:
    trainer = SklearnTrainer(SGDClassifier(), TRAIN, classes=[0, 1])
    params = trainer.initial_params()
    with pytest.raises(NotImplementedError, match=r"FedProx.*TorchTrainer or NumpyTrainer"):
        trainer.fit(params, FitConfig(round=1, proximal_mu=0.1))
    with pytest.raises(NotImplementedError, match="SCAFFOLD"):
        trainer.fit(params, FitConfig(round=1, gradient_correction=params))


def test_regressor_errors_and_missing_test_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.arange(1.0, 6.0) + 2.0
    trainer = SklearnTrainer(SGDRegressor(), (x, y), (x, y))
    params = trainer.initial_params()
    assert params["coef"].shape == (5,) and params["intercept"].shape == (1,)
    trained = params + trainer.fit(params, FitConfig(round=1, epochs=5)).delta
    assert trainer.evaluate(trained, EvalConfig(round=1)).metrics["loss"] < 0.01
    np.testing.assert_allclose(trained["coef"], np.arange(1.0, 6.0), atol=0.05)
    with pytest.raises(ParamsError, match="coef"):
        trainer.fit(Params.from_arrays({"coef": np.zeros(4), "intercept": [0.0]}), FitConfig(1))
    with pytest.raises(ValueError, match="classes"):
        SklearnTrainer(SGDClassifier(), TRAIN)
    with pytest.raises(ValueError, match="test data"):
        SklearnTrainer(SGDClassifier(), TRAIN, classes=[0, 1]).evaluate(params, EvalConfig(1))
