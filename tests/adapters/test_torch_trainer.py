"""TorchTrainer: exactness against hand-written loops, sharing, determinism, learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedloom.adapters.torch_trainer import TorchTrainer, load_into_module, params_from_module
from fedloom.core.params import Params, ParamsError
from fedloom.core.trainer import Trainer
from fedloom.core.types import EvalConfig, FitConfig


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def data(n: int = 37, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 3, size=n)


def reference_fit(
    model: nn.Module,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    cfg: FitConfig,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, np.ndarray]:
    """Textbook per-tensor SGD loop with FedProx and SCAFFOLD terms; returns the delta."""
    model.load_state_dict({k: torch.tensor(v) for k, v in params.items()}, strict=False)
    named = dict(model.named_parameters())
    anchor = {k: p.detach().clone() for k, p in named.items()}
    corr = cfg.gradient_correction
    opt = torch.optim.SGD(named.values(), lr=cfg.learning_rate, momentum=momentum,
                          weight_decay=weight_decay)  # fmt: skip
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(xt[idx]), yt[idx]))
            with torch.no_grad():
                for k, p in named.items():
                    assert p.grad is not None
                    p.grad += cfg.proximal_mu * (p - anchor[k])
                    if corr is not None:
                        p.grad += torch.tensor(corr[k])
            opt.step()
    state = model.state_dict()
    return {k: state[k].numpy() - params[k] for k in params}


def assert_delta(delta: Params, expected: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert list(delta) == list(expected)
    for k in expected:
        np.testing.assert_allclose(delta[k], expected[k], atol=atol, rtol=0, err_msg=k)


@pytest.mark.parametrize(
    ("mu", "with_corr", "momentum", "wd", "dropout"),
    [
        (0.0, False, 0.0, 0.0, 0.0),
        (0.3, False, 0.0, 0.0, 0.0),
        (0.0, True, 0.0, 0.0, 0.0),
        (0.1, True, 0.9, 0.01, 0.5),
    ],
)
def test_fit_matches_reference_loop(
    mu: float, with_corr: bool, momentum: float, wd: float, dropout: float
) -> None:
    x, y = data()
    model, ref_model = mlp(dropout=dropout), mlp(dropout=dropout)
    trainer = TorchTrainer(model, (x, y), momentum=momentum, weight_decay=wd)
    start = trainer.initial_params() + Params.from_arrays(
        {k: np.full(v.shape, 0.05) for k, v in trainer.initial_params().items()}
    )
    rng = np.random.default_rng(1)
    corr = start.with_flat(rng.normal(size=start.layout.size).astype(np.float32) * 0.1)
    cfg = FitConfig(round=1, epochs=3, batch_size=8, learning_rate=0.1, seed=7,
                    proximal_mu=mu, gradient_correction=corr if with_corr else None)  # fmt: skip
    update = trainer.fit(start, cfg)
    assert update.num_examples == 37 and update.num_steps == 3 * 5
    assert update.delta.layout == start.layout and update.delta.flat.dtype == np.float32
    assert_delta(update.delta, reference_fit(ref_model, start, x, y, cfg, momentum, wd))
    assert update.metrics["train_loss"] > 0


def test_batchnorm_buffers_follow_forward_and_are_never_stepped() -> None:
    x, y = data()
    model = bn_net()
    trainer = TorchTrainer(model, (x, y))
    start = trainer.initial_params()
    corr = start.with_flat(np.ones(start.layout.size, dtype=np.float32))  # also on buffers
    cfg = FitConfig(round=1, epochs=2, batch_size=10, learning_rate=0.05, seed=3,
                    proximal_mu=0.5, gradient_correction=corr)  # fmt: skip
    expected = reference_fit(bn_net(), start, x, y, cfg)
    assert_delta(trainer.fit(start, cfg).delta, expected)
    assert np.abs(expected["1.running_mean"]).sum() > 0  # running stats did move


class WithSpare(nn.Module):
    """A net whose `spare` parameter never reaches the loss, and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.spare = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_unreached_parameters_get_the_correction_and_frozen_ones_stay() -> None:
    trainer = TorchTrainer(WithSpare(), data())
    start = trainer.initial_params()
    corr = start.with_flat(np.full(start.layout.size, 0.5, dtype=np.float32))
    cfg = FitConfig(round=1, epochs=1, batch_size=10, learning_rate=0.1, gradient_correction=corr)
    delta = trainer.fit(start, cfg).delta
    np.testing.assert_allclose(delta["spare"], -0.1 * 0.5 * 4, rtol=1e-6)  # 4 steps of lr * c
    np.testing.assert_array_equal(delta["frozen"], 0.0)


def test_round_trip_includes_float_buffers_only() -> None:
    model = bn_net()
    params = params_from_module(model)
    assert list(params) == [k for k in model.state_dict() if "num_batches_tracked" not in k]
    assert params["1.running_var"].shape == (16,)
    for k, v in model.state_dict().items():
        if k in params:
            np.testing.assert_array_equal(params[k], v.numpy())
    changed = params.with_flat(np.arange(params.layout.size, dtype=np.float32))
    load_into_module(model, changed)
    state = model.state_dict()
    for k in changed:
        np.testing.assert_array_equal(state[k].numpy(), changed[k])
    assert params_from_module(model).allclose(changed, rtol=0, atol=0)
    # the module still trains normally after its tensors were re-homed
    torch.autograd.backward(model(torch.randn(4, 8)).sum())
    assert model.get_submodule("0").weight.grad is not None


def test_moving_a_wrapped_module_rebuilds_its_flat_view() -> None:
    model = mlp()
    before = params_from_module(model)
    model.double()
    after = params_from_module(model)
    assert after.flat.dtype == np.float64 and np.allclose(after.flat, before.flat)
    trainer = TorchTrainer(model, data())
    update = trainer.fit(after, FitConfig(round=1, seed=1))
    assert update.delta.flat.dtype == np.float64 and update.delta.norm() > 0


def test_shape_mismatch_names_the_tensor() -> None:
    model = mlp()
    bad = dict(params_from_module(model).items())
    bad["3.weight"] = np.zeros((4, 16), dtype=np.float32)
    with pytest.raises(ParamsError, match=r"3\.weight"):
        load_into_module(model, Params.from_arrays(bad))
    trainer = TorchTrainer(model, data())
    with pytest.raises(ValueError, match=r"3\.weight"):
        trainer.fit(Params.from_arrays(bad), FitConfig(round=1))


def test_trainers_sharing_a_module_do_not_interfere() -> None:
    shared = mlp()
    a = TorchTrainer(shared, data(seed=1), data(seed=3))
    b = TorchTrainer(shared, data(seed=2))
    alone = TorchTrainer(mlp(seed=5), data(seed=1), data(seed=3))  # different initial weights
    start = a.initial_params()
    cfg = FitConfig(round=1, epochs=2, batch_size=5, learning_rate=0.1, seed=4)
    first = a.fit(start, cfg)
    b.fit(start + first.delta, cfg)
    shared.zero_grad(set_to_none=True)  # outside code dropping gradients must not matter
    again = a.fit(start, cfg)
    assert first.delta.allclose(again.delta, rtol=0, atol=0)
    assert first.delta.allclose(alone.fit(start, cfg).delta, rtol=0, atol=0)
    assert a.evaluate(start, EvalConfig(round=1)) == alone.evaluate(start, EvalConfig(round=1))


def test_deterministic_per_seed() -> None:
    trainer = TorchTrainer(mlp(dropout=0.3), data())
    start = trainer.initial_params()

    def run(seed: int) -> Params:
        return trainer.fit(start, FitConfig(round=1, batch_size=4, seed=seed)).delta

    assert run(1).allclose(run(1), rtol=0, atol=0)
    assert not run(1).allclose(run(2), rtol=0, atol=0)


def test_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 8))
    labels = rng.integers(0, 3, size=600)
    x = (centers[labels] + rng.normal(size=(600, 8))).astype(np.float32)
    trainer = TorchTrainer(mlp(), (x[:400], labels[:400]), (x[400:], labels[400:]))
    params = trainer.initial_params()
    before = trainer.evaluate(params, EvalConfig(round=0, batch_size=64))
    for r in range(3):
        params = params + trainer.fit(params, FitConfig(round=r, batch_size=16, seed=r)).delta
    after = trainer.evaluate(params, EvalConfig(round=3, batch_size=64))
    assert after.num_examples == 200
    assert after.metrics["accuracy"] > 0.95 > before.metrics["accuracy"]
    assert after.metrics["loss"] < before.metrics["loss"]


def test_evaluate_without_test_data_and_protocol() -> None:
    trainer = TorchTrainer(mlp(), data())
    assert isinstance(trainer, Trainer)
    with pytest.raises(ValueError, match="test data"):
        trainer.evaluate(trainer.initial_params(), EvalConfig(round=1))


def test_regression_targets_and_custom_loss() -> None:
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    model = nn.Linear(8, 1)
    ref = copy.deepcopy(model)
    trainer = TorchTrainer(model, (x, x[:, :1] * 2.0), (x, x[:, :1] * 2.0), loss=F.mse_loss)
    start = trainer.initial_params()
    ev = trainer.evaluate(start, EvalConfig(round=1))
    assert "accuracy" not in ev.metrics
    with torch.no_grad():
        expected = F.mse_loss(ref(torch.tensor(x)), torch.tensor(x[:, :1] * 2.0)).item()
    assert ev.metrics["loss"] == pytest.approx(expected, rel=1e-5)
