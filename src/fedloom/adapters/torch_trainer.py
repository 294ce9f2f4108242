"""PyTorch adapter: a `Trainer` around an `nn.Module`, built for simulation speed.

The first time fedloom touches a module it re-homes the module's floating-point parameters and
buffers (in `state_dict` order) into ONE contiguous tensor: every `Parameter.data` and float
buffer becomes a view of it. Loading `Params` is then one copy and reading the trained model one
subtraction. Gradients are left where autograd puts them (accumulating them into a flat buffer
measured ~15% slower per step on the 2NN); an SGD step, FedProx and SCAFFOLD terms included,
is a few `torch._foreach_*` calls over the trainable tensors. The values of the module are
unchanged by this; the same `Parameter` objects stay in place.

Several trainers may share one module (a simulation builds one trainer per client around the
same model): every `fit` and `evaluate` loads its `params` first and assumes nothing about what
the module holds. Trainers sharing a module must not run concurrently (not thread-safe).

The flat view of a module is cached per module (weakly, so it dies with the module). Moving
the module (`.to()`, `.double()`) after wrapping is detected and the view rebuilt, but build
new trainers then (their data tensors keep the old device and dtype). Replacing parameters or
submodules of a wrapped module is not supported.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from fedloom.core.params import Layout, Params, ParamsError, TensorSpec
from fedloom.core.types import EvalConfig, Evaluation, FitConfig, Update

#: `loss(outputs, targets) -> scalar tensor`, the mean loss over the batch.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Training or test data: NumPy arrays, anything `np.asarray` accepts, or tensors.
Data = torch.Tensor | npt.ArrayLike

_NP_DTYPES: dict[torch.dtype, type[np.floating]] = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
}


class FlatModule:
    """A module's float state as views of one flat tensor."""

    __slots__ = ("flat", "flat_np", "layout", "params", "ptrs", "spans", "tensors", "views")

    def __init__(self, module: nn.Module) -> None:
        entries: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) in seen or not t.is_floating_point():
                continue  # tied weights once; integer buffers (num_batches_tracked) never
            seen.add(id(t))
            entries.append((name, t))
        if not entries:
            raise ValueError("module has no floating-point parameters or buffers")
        dtypes = {t.dtype for _, t in entries}
        devices = {t.device for _, t in entries}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"module mixes dtypes {dtypes} or devices {devices}; use one of each")
        dtype, device = dtypes.pop(), devices.pop()
        if dtype not in _NP_DTYPES:
            raise ValueError(f"module dtype {dtype} is not supported (use float16/32/64)")
        total = sum(t.numel() for _, t in entries)
        self.flat = torch.empty(total, dtype=dtype, device=device)
        self.params: list[torch.Tensor] = []  # trainable parameters (the ones SGD steps)
        self.views: list[torch.Tensor] = []  # their slices of `flat` (plain tensors)
        self.spans: list[tuple[int, int, torch.Size]] = []  # where those slices lie
        offset = 0
        for _, t in entries:
            n = t.numel()
            view = self.flat[offset : offset + n].view(t.shape)
            view.copy_(t.detach())
            t.data = view
            if isinstance(t, nn.Parameter) and t.requires_grad:
                self.params.append(t)
                self.views.append(view)
                self.spans.append((offset, offset + n, t.shape))
            offset += n
        self.tensors = [t for _, t in entries]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.flat_np = self.flat.numpy() if device.type == "cpu" else None
        specs = tuple(TensorSpec(name, tuple(t.shape)) for name, t in entries)
        self.layout = Layout(specs, np.dtype(_NP_DTYPES[dtype]))

    def intact(self) -> bool:
        """True if no tensor was moved out of the flat buffer (by `.to()`, say)."""
        return all(t.data_ptr() == p for t, p in zip(self.tensors, self.ptrs, strict=True))

    def trainable(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector in this layout, one per trainable parameter."""
        return [flat[a:b].view(shape) for a, b, shape in self.spans]

    def load(self, params: Params) -> None:
        """Copy `params` into the module (one copy); raise `ParamsError` naming a bad tensor."""
        if params.layout is not self.layout and params.layout.specs != self.layout.specs:
            theirs = Layout(params.layout.specs, self.layout.dtype)
            reason = self.layout.describe_mismatch(theirs)
            raise ParamsError(f"cannot load Params into module: {reason}")
        src = params.flat
        if self.flat_np is not None:
            np.copyto(self.flat_np, src, casting="same_kind")
        else:  # accelerator: one host-to-device copy (untested here: no GPU in CI)
            if not src.flags.writeable or src.dtype != self.layout.dtype:
                src = np.array(src, dtype=self.layout.dtype)
            self.flat.copy_(torch.from_numpy(src))

    def read(self) -> npt.NDArray[np.floating]:
        """The module's current values as a NumPy array (a live view on CPU, a copy otherwise)."""
        return self.flat_np if self.flat_np is not None else self.flat.cpu().numpy()


_CACHE: weakref.WeakKeyDictionary[nn.Module, FlatModule] = weakref.WeakKeyDictionary()


def flat_module(module: nn.Module) -> FlatModule:
    """The module's float state as views of one flat tensor (built on first use, then cached
    per module; rebuilt if the module was moved). Runtimes that train a module themselves (the
    vectorized transport) read its layout and spans here; treat it as read-only."""
    state = _CACHE.get(module)
    if state is None or not state.intact():
        state = FlatModule(module)
        _CACHE[module] = state
    return state


def params_from_module(module: nn.Module) -> Params:
    """A copy of the module's float parameters and buffers, in `state_dict` order.

    Integer buffers (such as BatchNorm's `num_batches_tracked`) are left out; tied tensors
    appear once. The first call re-homes the module's tensors into one flat buffer (values and
    `Parameter` objects unchanged).
    """
    state = flat_module(module)
    return Params(state.layout, state.read().copy())


def load_into_module(module: nn.Module, params: Params) -> None:
    """Copy `params` into the module's parameters and float buffers.

    Raises `ParamsError` (a `ValueError`) naming the offending tensor if names or shapes differ.
    A different float dtype is converted.
    """
    flat_module(module).load(params)


def _to_tensor(a: Data, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    """Float data takes the model's `dtype`; integer data becomes int64 (class labels, or
    token indices for an `nn.Embedding`). Read-only arrays (strided views) are copied."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        t = torch.from_numpy(arr if arr.flags.writeable else np.array(arr))
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not t.is_floating_point():
        dtype = torch.int64
    return t.to(device=device, dtype=dtype).contiguous()


class TorchTrainer:
    """A `Trainer` that trains an `nn.Module` with plain mini-batch SGD.

    Args:
        model: the module; may be shared by many trainers (see the module docstring).
        train: `(x, y)`; float x and y take the model's float dtype, integer x and y become
            int64 (labels; token indices for an `nn.Embedding`, so convert integer images to
            float first). Converted to tensors on the model's device once.
        test: optional `(x, y)` for `evaluate`.
        loss: `loss(outputs, targets) -> mean loss over the batch`; default cross-entropy.
        optimizer: only `"sgd"`.
        momentum: heavy-ball momentum as in `torch.optim.SGD` (no dampening); the momentum
            buffer starts at zero in every `fit`.
        weight_decay: L2 coefficient added to the gradient as in `torch.optim.SGD`.

    `fit` computes, every step, `g = grad + mu * (w - w_global) + correction + weight_decay * w`
    on trainable parameters only (buffers and frozen parameters are never stepped), then
    `w -= lr * g` (or the momentum buffer). Each epoch visits the data in the order
    `torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))` (one draw per
    epoch from one generator) in batches of `config.batch_size`; the last batch may be smaller.
    For dropout and other in-model randomness, `fit` seeds the default generator of the model's
    device with `config.seed` (`torch.manual_seed` itself costs ~100 us, so it is not used).
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[Data, Data],
        test: tuple[Data, Data] | None = None,
        *,
        loss: LossFn | None = None,
        optimizer: Literal["sgd"] = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if optimizer != "sgd":
            raise ValueError(f"optimizer must be 'sgd', not {optimizer!r}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        self.model = model
        state = flat_module(model)
        dtype, device = state.flat.dtype, state.flat.device
        self._x = _to_tensor(train[0], dtype, device, "train x")
        self._y = _to_tensor(train[1], dtype, device, "train y")
        if len(self._x) != len(self._y):
            raise ValueError(f"train has {len(self._x)} inputs but {len(self._y)} targets")
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        if test is not None:
            tx = _to_tensor(test[0], dtype, device, "test x")
            ty = _to_tensor(test[1], dtype, device, "test y")
            if len(tx) != len(ty):
                raise ValueError(f"test has {len(tx)} inputs but {len(ty)} targets")
            self._test = (tx, ty)
        self._loss: LossFn = loss if loss is not None else F.cross_entropy
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._gen = torch.Generator()

    @property
    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training `(x, y)` tensors as converted at construction (do not modify them)."""
        return self._x, self._y

    @property
    def loss(self) -> LossFn:
        """The loss function `fit` minimizes."""
        return self._loss

    @property
    def num_train_examples(self) -> int:
        """Number of training examples (the `num_examples` of every `Update`)."""
        return len(self._x)

    def initial_params(self) -> Params:
        """A copy of the model's current parameters and float buffers."""
        return params_from_module(self.model)

    def fit(self, params: Params, config: FitConfig) -> Update:
        """Load `params`, train `config.epochs` epochs of SGD, return the delta.

        The delta has `params`' layout and dtype; `num_steps` counts optimizer steps;
        `metrics["train_loss"]` is the mean per-example loss over the last epoch.
        """
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        model, state = self.model, flat_module(self.model)
        state.load(params)
        device, weights, views = state.flat.device, state.params, state.views
        mu, lr = config.proximal_mu, config.learning_rate
        wd, momentum = self.weight_decay, self.momentum
        anchor = state.trainable(state.flat.clone()) if mu > 0 else None
        correction: list[torch.Tensor] | None = None
        if config.gradient_correction is not None:
            corr = config.gradient_correction
            if corr.layout.specs != state.layout.specs:
                raise ParamsError("gradient_correction does not match the model's layout")
            flat_corr = torch.from_numpy(np.asarray(corr.flat, dtype=state.layout.dtype))
            correction = state.trainable(flat_corr.to(device))
        velocity: list[torch.Tensor] | None = None

        if device.type == "cuda":
            torch.cuda.manual_seed(config.seed)
        else:
            torch.default_generator.manual_seed(config.seed)
        gen = self._gen.manual_seed(config.seed)
        model.train()
        for w in weights:
            w.grad = None
        x, y, n, batch = self._x, self._y, len(self._x), config.batch_size
        losses: list[torch.Tensor] = []
        steps = 0
        with torch.enable_grad():
            for epoch in range(config.epochs):
                perm = torch.randperm(n, generator=gen).to(device)
                last = epoch == config.epochs - 1
                xs, ys = x.index_select(0, perm), y.index_select(0, perm)
                for xb, yb in zip(torch.split(xs, batch), torch.split(ys, batch), strict=True):
                    loss = self._loss(model(xb), yb)
                    torch.autograd.backward(loss)
                    grads = [w.grad for w in weights]
                    for w in weights:
                        w.grad = None
                    if any(g is None for g in grads):  # parameters this batch did not reach
                        grads = [
                            torch.zeros_like(v) if g is None else g
                            for g, v in zip(grads, views, strict=True)
                        ]
                    step = cast(list[torch.Tensor], grads)
                    if anchor is not None:
                        torch._foreach_add_(step, torch._foreach_sub(views, anchor), alpha=mu)
                    if correction is not None:
                        torch._foreach_add_(step, correction)
                    if wd > 0:
                        torch._foreach_add_(step, views, alpha=wd)
                    if momentum > 0:
                        if velocity is None:
                            velocity = [g.clone() for g in step]
                        else:
                            torch._foreach_mul_(velocity, momentum)
                            torch._foreach_add_(velocity, step)
                        step = velocity
                    torch._foreach_add_(views, step, alpha=-lr)
                    steps += 1
                    if last:
                        losses.append(loss.detach())
        metrics: dict[str, float] = {}
        if losses:
            values = torch.stack(losses).tolist()
            tail = n - batch * (len(values) - 1)
            metrics["train_loss"] = (sum(values[:-1]) * batch + values[-1] * tail) / n
        delta = np.subtract(state.read(), params.flat, dtype=params.flat.dtype)
        return Update(params.with_flat(delta), n, steps, metrics)

    def evaluate(self, params: Params, config: EvalConfig) -> Evaluation:
        """Mean loss and (for integer labels) accuracy of `params` on the test data.

        Raises `ValueError` if the trainer was built without test data.
        """
        if self._test is None:
            raise ValueError("TorchTrainer.evaluate needs test data: pass test=(x, y)")
        state = flat_module(self.model)
        state.load(params)
        self.model.eval()
        x, y = self._test
        labels = not y.is_floating_point()
        loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        with torch.no_grad():
            size = max(1, config.batch_size)
            for xb, yb in zip(torch.split(x, size), torch.split(y, size), strict=True):
                out = self.model(xb)
                loss_sum += self._loss(out, yb).double() * len(xb)
                if labels:
                    correct += (out.argmax(dim=-1) == yb).sum()
        n = len(x)
        metrics = {"loss": loss_sum.item() / n}
        if labels:
            metrics["accuracy"] = correct.item() / n
        return Evaluation(n, metrics)
