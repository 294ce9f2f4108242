"""VectorizedTransport against the sequential reference (InProcessTransport)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedloom import FedAvg, Federation, FedProx, Settings
from fedloom.adapters.torch_trainer import TorchTrainer
from fedloom.algorithms.base import PlainLocal
from fedloom.core.params import Params
from fedloom.core.types import EvalConfig, FitConfig, Task, TaskKind
from fedloom.runtime import lockstep
from fedloom.runtime.client import ClientPool
from fedloom.runtime.transport import InProcessTransport, Transport
from fedloom.runtime.vectorized import VectorizedTransport

# Unequal client sizes; with B=4 most have a short last batch and different batch counts.
SIZES = (5, 9, 12, 3, 17, 8, 10)


def _trainers(model: nn.Module, sizes: tuple[int, ...] = SIZES) -> dict[str, TorchTrainer]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, 6, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        out[f"c{i}"] = TorchTrainer(model, (x, y), (x, y))
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


class _Wrapped(nn.Module):
    """Not an `nn.Sequential`: trained through the vmapped autograd path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _model(kind: str) -> nn.Module:
    """`mlp`, `tanh-sigmoid` (no biases, identity) use the hand-derived MLP step; `vmap` the
    generic one (same MLP as `mlp`)."""
    if kind == "tanh-sigmoid":
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 5), nn.Sigmoid(),
            nn.Identity(), nn.Linear(5, 3, bias=False),
        )  # fmt: skip
    return _Wrapped(_mlp()) if kind == "vmap" else _mlp()


MODELS = ["mlp", "tanh-sigmoid", "vmap"]


def _final(
    transport: Transport, trainers: dict[str, TorchTrainer], strategy: object, init: Params
) -> Params:
    """The global model after 3 rounds from `init`."""
    settings = Settings(
        rounds=3, fraction_fit=0.75, epochs=2, batch_size=4, learning_rate=0.3, seed=3
    )
    with Federation(strategy, transport, list(trainers), settings) as fed:  # type: ignore[arg-type]
        return fed.run(init).state.params


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("strategy", [FedAvg(), FedProx(mu=0.5)], ids=["fedavg", "fedprox"])
def test_same_params_as_sequential(
    strategy: object, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_steps: list[int] = []
    real_step = lockstep.mlp_step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        hand_steps.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lockstep, "mlp_step", counting_step)
    trainers = _trainers(_model(kind))
    init = trainers["c0"].initial_params()  # before training: the module holds the last load
    seq = _final(InProcessTransport(ClientPool(trainers)), trainers, strategy, init)
    finals = []
    for threads, pool_limit in ((1, 2**31), (2, 2**31), (1, 0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback allowed here
            transport = VectorizedTransport(ClientPool(trainers), chunk_size=3, threads=threads)
            transport.max_pooled_bytes = pool_limit  # 0: gather from chunk-sized copies
            finals.append(_final(transport, trainers, strategy, init))
    assert np.abs(seq.flat - init.flat).max() > 1e-2  # training moved the model
    np.testing.assert_allclose(finals[0].flat, seq.flat, atol=1e-5)
    assert bool(hand_steps) == (kind != "vmap")  # MLPs take the hand-derived step
    # threads and where the data is gathered from change timing only
    np.testing.assert_array_equal(finals[1].flat, finals[0].flat)
    np.testing.assert_array_equal(finals[2].flat, finals[0].flat)


def test_threads_restore_torch_threads_and_stop() -> None:
    trainers = _trainers(_mlp())
    before = torch.get_num_threads()
    transport = VectorizedTransport(ClientPool(trainers), threads=2)
    _final(transport, trainers, FedAvg(), trainers["c0"].initial_params())
    assert torch.get_num_threads() == before
    transport.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        transport._executor.submit(print)  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "decay-correction-mu"])
def test_replies_match_fit_in_task_order(extras: bool, kind: str) -> None:
    trainers = _trainers(_model(kind))
    init = trainers["c0"].initial_params()
    rng = np.random.default_rng(0)
    tasks = []
    for i, cid in enumerate(trainers):
        corr = None
        if extras:
            trainers[cid].weight_decay = 0.01 * i
            corr = init.with_flat(rng.normal(size=init.flat.shape).astype(np.float32))
        config = FitConfig(
            0,
            epochs=2,
            batch_size=4,
            learning_rate=0.2,
            seed=i,
            proximal_mu=0.3 if extras else 0.0,
            gradient_correction=corr,
        )
        start = init if i % 2 else init.copy()  # not all tasks share one `Params` object
        tasks.append(Task(cid, TaskKind.FIT, start, config))
    tasks.insert(2, Task("c1", TaskKind.EVALUATE, init, evaluate=EvalConfig(0)))
    replies = list(
        VectorizedTransport(ClientPool(trainers), chunk_size=4).dispatch(tasks, PlainLocal())
    )
    assert [r.client_id for r in replies] == [t.client_id for t in tasks]
    assert replies[2].evaluation is not None
    for task, reply in zip(tasks, replies, strict=True):
        if task.kind is not TaskKind.FIT:
            continue
        assert task.fit is not None and reply.update is not None
        want = trainers[task.client_id].fit(init, task.fit)
        got = reply.update
        assert (got.num_examples, got.num_steps) == (want.num_examples, want.num_steps)
        np.testing.assert_allclose(got.delta.flat, want.delta.flat, atol=1e-6)
        assert got.metrics["train_loss"] == pytest.approx(want.metrics["train_loss"], rel=1e-5)


def test_unsupported_model_warns_and_falls_back() -> None:
    def bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    trainers = _trainers(bn_model(), sizes=(8, 12, 16, 8))
    init = trainers["c0"].initial_params()
    seq = _final(InProcessTransport(ClientPool(trainers)), trainers, FedAvg(), init)
    with pytest.warns(RuntimeWarning, match="sequentially because the model has buffers") as rec:
        vec = _final(VectorizedTransport(ClientPool(trainers)), trainers, FedAvg(), init)
    assert len([w for w in rec if "VectorizedTransport" in str(w.message)]) == 1  # once
    np.testing.assert_array_equal(vec.flat, seq.flat)


def test_momentum_falls_back() -> None:
    model = _mlp()
    trainers = {
        "a": TorchTrainer(model, (torch.randn(4, 6), torch.tensor([0, 1, 2, 0])), momentum=0.9)
    }
    init = trainers["a"].initial_params()
    task = Task("a", TaskKind.FIT, init, FitConfig(0, batch_size=2))
    with pytest.warns(RuntimeWarning, match="momentum"):
        (reply,) = VectorizedTransport(ClientPool(trainers)).dispatch([task], PlainLocal())
    assert reply.update is not None and reply.update.num_steps == 2


def test_mlp_plan_covers_only_plain_mlps() -> None:
    from fedloom.runtime.lockstep import Linear, mlp_plan

    keys = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert mlp_plan(_mlp(), keys) == [
        Linear("0.weight", "0.bias"),
        nn.ReLU,
        Linear("2.weight", "2.bias"),
    ]
    assert mlp_plan(_Wrapped(_mlp()), keys) is None
    assert mlp_plan(nn.Sequential(nn.Linear(6, 8), nn.GELU()), keys[:2]) is None
