"""The batched computation behind `VectorizedTransport`: a chunk of clients trained in
lockstep, one row of weights per client.

`train_chunk` gives, for every client of a chunk, the `Update` that `TorchTrainer.fit` would
give (up to float rounding): the same seeded `randperm` batches, plain SGD with the FedProx,
gradient-correction and weight-decay terms, clients with fewer batches masked once their data
runs out. Gradients come from `torch.func` (`functional_call` + `grad_and_value` + `vmap`) or,
for an `nn.Sequential` MLP with cross-entropy, from a hand-derived batched backward
(`mlp_step`) that also fuses plain SGD into the weight-gradient matmuls. Pure functions of their
inputs apart from the scratch `Workspace`; nothing here is thread-unsafe except sharing one
`Workspace` or running `functional_call` on one module from two threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from fedloom.adapters.torch_trainer import TorchTrainer, flat_module
from fedloom.core.types import Task, Update


class Workspace:
    """Scratch tensors reused from chunk to chunk (and round to round), so the batched data of
    every chunk is not written into freshly mapped memory (first-touch page faults cost about as
    much as the copy itself). Never handed out: nothing that leaves `train_chunk` lives here."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor `name` of `shape` with `like`'s dtype and device."""
        t = self._tensors.get(name)
        numel = math.prod(shape)
        if t is None or t.dtype != like.dtype or t.device != like.device or t.numel() < numel:
            t = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._tensors[name] = t
        return t[:numel].view(shape)


def _per_example_loss(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(outputs, targets) -> (n,)` losses of a batch-mean loss function."""
    if loss is F.cross_entropy:  # class labels: nll of log_softmax, as F.cross_entropy does
        return lambda out, y: -out.log_softmax(-1).gather(-1, y[..., None])[..., 0]

    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss(o[None], t[None])

    per: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = vmap(one)
    return per


class PooledData:
    """The training data of many `TorchTrainer`s in one tensor pair, plus a trailing zero row
    (what padding points at), so a chunk's batches are one `index_select` away. A transport
    builds it once for all its clients: it costs a second copy of their training data."""

    def __init__(self, trainers: Sequence[TorchTrainer]) -> None:
        xs = [tr.train_data[0] for tr in trainers]
        ys = [tr.train_data[1] for tr in trainers]
        self.x = torch.cat([*xs, torch.zeros_like(xs[0][:1])])
        self.y = torch.cat([*ys, torch.zeros_like(ys[0][:1])])
        self.zero_row = len(self.x) - 1
        self._where: dict[int, tuple[int, torch.Tensor]] = {}
        offset = 0
        for tr, x in zip(trainers, xs, strict=True):
            self._where[id(tr)] = (offset, x)  # the tensor, to tell a new trainer at a reused id
            offset += len(x)

    def offsets(self, trainers: Sequence[TorchTrainer]) -> list[int] | None:
        """Where each trainer's rows start, or None if one of them is not in here."""
        out = []
        for tr in trainers:
            found = self._where.get(id(tr))
            if found is None or found[1] is not tr.train_data[0]:
                return None
            out.append(found[0])
        return out


def _batches(
    tasks: Sequence[Task],
    trainers: Sequence[TorchTrainer],
    epochs: int,
    batch: int,
    workspace: Workspace,
    pooled: PooledData | None,
) -> tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.int64], list[int]]:
    """Every client's training data in the order `TorchTrainer.fit` visits it.

    Returns `x` of shape `(steps, C, batch, ...)` and `y` likewise, where `x[s, i]` is client
    i's step `s = e * per_epoch[i] + j`: batch j of epoch e of the seeded `randperm` order (a
    short last batch and the steps after a client's data ran out are zero padding), so each
    step's input is contiguous; the number of real examples per step, `(steps, C)`; and each
    client's batches per epoch. One `index_select` from `pooled` (a chunk-sized `PooledData`
    is built first when `pooled` lacks one of the trainers).
    """
    sizes = [tr.num_train_examples for tr in trainers]
    per_epoch = [-(-n // batch) for n in sizes]
    steps = max(per_epoch) * epochs
    offsets = pooled.offsets(trainers) if pooled is not None else None
    if pooled is None or offsets is None:
        pooled = PooledData(trainers)
        offsets = list(np.cumsum([0, *sizes[:-1]]))
    index = np.full((len(tasks), steps * batch), pooled.zero_row, dtype=np.int64)
    counts = np.zeros((len(tasks), steps), dtype=np.int64)
    for i, (task, n) in enumerate(zip(tasks, sizes, strict=True)):
        assert task.fit is not None
        span = per_epoch[i] * batch
        gen = torch.Generator().manual_seed(task.fit.seed)
        for e in range(epochs):
            perm = torch.randperm(n, generator=gen).numpy()
            index[i, e * span : e * span + n] = perm + offsets[i]
        full, tail = divmod(n, batch)
        row = np.full(per_epoch[i], batch)
        row[full:] = tail
        counts[i, : epochs * per_epoch[i]] = np.tile(row, epochs)
    step_major = index.reshape(len(tasks), steps, batch).transpose(1, 0, 2).reshape(-1)
    flat_index = torch.from_numpy(np.ascontiguousarray(step_major)).to(pooled.x.device)
    x_shape, y_shape = pooled.x.shape[1:], pooled.y.shape[1:]
    x = workspace.get("x", (steps, len(tasks), batch, *x_shape), pooled.x)
    y = workspace.get("y", (steps, len(tasks), batch, *y_shape), pooled.y)
    torch.index_select(pooled.x, 0, flat_index, out=x.view(-1, *x_shape))
    torch.index_select(pooled.y, 0, flat_index, out=y.view(-1, *y_shape))
    return x, y, counts.T, per_epoch


#: Elementwise activations the hand-derived MLP step knows, with their derivative expressed
#: through their output (None: the identity).
_ACTIVATIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None] = {
    nn.ReLU: lambda out: out > 0,
    nn.Tanh: lambda out: 1 - out * out,
    nn.Sigmoid: lambda out: out * (1 - out),
    nn.Identity: None,
}
_FORWARD: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.Identity: lambda h: h,
}


@dataclass(frozen=True)
class Linear:
    """An `nn.Linear` layer of an MLP plan: the keys of its weight and bias."""

    weight: str
    bias: str | None


def mlp_plan(model: nn.Module, keys: Sequence[str]) -> list[Linear | type[nn.Module]] | None:
    """The layers of `model` (`Linear`, or an activation type of `_ACTIVATIONS`) if it is an
    `nn.Sequential` of `nn.Linear` and those activations (an MLP or a linear model), else None."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    plan: list[Linear | type[nn.Module]] = []
    for name, layer in model.named_children():
        if type(layer) is nn.Linear:
            bias = f"{name}.bias" if layer.bias is not None else None
            if f"{name}.weight" not in keys or (bias is not None and bias not in keys):
                return None
            plan.append(Linear(f"{name}.weight", bias))
        elif type(layer) in _ACTIVATIONS:
            plan.append(type(layer))
        else:
            return None
    return plan


def _same_for_all(t: torch.Tensor) -> bool:
    """True for a `(C, ...)` tensor expanded from one row (stride 0): every client's copy of
    the global weights before the first step."""
    return t.stride(0) == 0


def mlp_step(
    plan: Sequence[Linear | type[nn.Module]],
    params: dict[str, torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    sgd_lr: float | None = None,
    workspace: Workspace | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What `vmap(grad_and_value(loss_fn))` returns for an MLP with cross-entropy, derived by
    hand: for `(C, B, in)` inputs and `(C, B)` labels and loss weights, the gradients of
    `sum_b wb * nll` per client and that loss `(C,)`. Batched matmuls and no autograd graph:
    one MNIST 784-32-10 step takes about 0.7x the time of the vmapped autograd step. Weights
    that are the same for every client (expanded, stride 0) are applied as one plain matmul
    over all `C * B` rows.

    With `sgd_lr`, instead of gradients it returns the parameters after the plain SGD step
    `w -= sgd_lr * grad`, each weight updated inside its gradient's matmul: in place, except
    that a weight shared by all clients is replaced by a `(C, ...)` tensor of `workspace` (a
    new one without it)."""

    def fresh(key: str, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape)
        return (
            torch.empty(shape, dtype=like.dtype)
            if workspace is None
            else workspace.get(key, shape, like)
        )

    outs = [xb]  # the input of layer i is outs[i]
    h = xb
    for layer in plan:
        if isinstance(layer, Linear):
            weight = params[layer.weight]
            bias = params[layer.bias] if layer.bias is not None else None
            if _same_for_all(weight) and (bias is None or _same_for_all(bias)):
                rows = h.reshape(-1, h.shape[-1])
                flat = (
                    rows @ weight[0].T if bias is None else torch.addmm(bias[0], rows, weight[0].T)
                )
                h = flat.view(*h.shape[:-1], -1)
            elif bias is None:
                h = torch.bmm(h, weight.transpose(1, 2))
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            h = _FORWARD[layer](h)
        outs.append(h)
    logp = h.log_softmax(-1)
    loss = -(logp.gather(-1, yb[..., None])[..., 0] * wb).sum(1)
    g = logp.exp_()  # d loss / d logits = wb * (softmax - one_hot(y))
    g.scatter_add_(-1, yb[..., None], torch.full_like(g[..., :1], -1.0))
    g.mul_(wb[..., None])
    out: dict[str, torch.Tensor] = {} if sgd_lr is None else dict(params)
    for i in range(len(plan) - 1, -1, -1):
        layer = plan[i]
        if isinstance(layer, Linear):
            weight = params[layer.weight]
            g_in = None  # the gradient at the layer's input, with the weights before the step
            if i > 0 and _same_for_all(weight):
                g_in = (g.reshape(-1, g.shape[-1]) @ weight[0]).view(*g.shape[:-1], -1)
            elif i > 0:
                g_in = torch.bmm(g, weight)
            if sgd_lr is None:
                out[layer.weight] = torch.bmm(g.transpose(1, 2), outs[i])
                if layer.bias is not None:
                    out[layer.bias] = g.sum(1)
            else:  # the step itself, fused into the gradient's matmul
                if _same_for_all(weight):
                    out[layer.weight] = torch.baddbmm(
                        weight,
                        g.transpose(1, 2),
                        outs[i],
                        alpha=-sgd_lr,
                        out=fresh(layer.weight, weight),
                    )
                else:
                    weight.baddbmm_(g.transpose(1, 2), outs[i], alpha=-sgd_lr)
                if layer.bias is not None:
                    bias = params[layer.bias]
                    if _same_for_all(bias):
                        out[layer.bias] = torch.add(
                            bias, g.sum(1), alpha=-sgd_lr, out=fresh(layer.bias, bias)
                        )
                    else:
                        bias.add_(g.sum(1), alpha=-sgd_lr)
            if g_in is not None:
                g = g_in
        else:
            derivative = _ACTIVATIONS[layer]
            if derivative is not None:
                g = g * derivative(outs[i + 1])
    return out, loss


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`v` of shape `(C,)` viewed to broadcast over `like` of shape `(C, ...)`."""
    return v.view(-1, *[1] * (like.dim() - 1))


def train_chunk(
    model: nn.Module,
    replica: nn.Module,
    tasks: Sequence[Task],
    trainers: Sequence[TorchTrainer],
    mu: float,
    workspace: Workspace,
    pooled: PooledData | None = None,
) -> list[Update]:
    """Train the chunk's clients in lockstep; the `Update` each `TorchTrainer.fit` would give.
    `replica` is the module `functional_call` runs (`model` or a copy of it); `pooled` holds
    the clients' data if the caller pooled it."""
    config = tasks[0].fit
    assert config is not None
    state = flat_module(model)
    dtype, device = state.flat.dtype, state.flat.device
    epochs, batch, lr, c = config.epochs, config.batch_size, config.learning_rate, len(tasks)
    names = {id(p): name for name, p in model.named_parameters()}
    keys = [names[id(p)] for p in state.params]
    per_example = _per_example_loss(trainers[0].loss)

    def loss_fn(
        params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(replica, params, (xb,))
        return (per_example(out, yb) * wb).sum()

    sizes = [tr.num_train_examples for tr in trainers]
    x, y, counts, per_epoch = _batches(tasks, trainers, epochs, batch, workspace, pooled)
    mlp = mlp_plan(model, keys) if trainers[0].loss is F.cross_entropy and x.dim() == 4 else None
    step_fn = vmap(grad_and_value(loss_fn)) if mlp is None else partial(mlp_step, mlp)
    steps = len(counts)
    # Per-example loss weights: 1 / (real examples in the batch), 0 on padding.
    real = np.arange(batch)[None, None, :] < counts[:, :, None]
    weight = torch.from_numpy(real / np.maximum(counts, 1)[:, :, None]).to(device, dtype)
    all_alive = [bool((row > 0).all()) for row in counts]
    alive = torch.from_numpy(counts > 0).to(device, dtype)  # (steps, c)
    last = np.arange(steps)[:, None] >= (epochs - 1) * np.array(per_epoch)[None, :]
    counted = torch.from_numpy(np.where(last, counts, 0)).to(device, torch.float64)

    # Global weights: one row per client (expanded, not copied, when all tasks share them).
    first = tasks[0].params
    if all(t.params is first for t in tasks):
        flat0 = torch.from_numpy(np.asarray(first.flat)).to(device, dtype).expand(c, -1)
    else:
        flat0 = torch.from_numpy(np.stack([t.params.flat for t in tasks])).to(device, dtype)
    w0 = [flat0[:, a:b].reshape(c, *shape) for a, b, shape in state.spans]
    extra: list[torch.Tensor] | None = None  # gradient correction, as one (c, P) tensor
    if any(t.fit is not None and t.fit.gradient_correction is not None for t in tasks):
        rows = [
            np.zeros(flat0.shape[1])
            if t.fit is None or t.fit.gradient_correction is None
            else t.fit.gradient_correction.flat
            for t in tasks
        ]
        corr = torch.from_numpy(np.stack(rows)).to(device, dtype)
        extra = [corr[:, a:b].reshape(c, *shape) for a, b, shape in state.spans]
    decay = torch.tensor([tr.weight_decay for tr in trainers], dtype=dtype, device=device)
    has_decay = bool((decay > 0).any())
    # Plain SGD on an MLP: the step is fused into the backward pass, and the first step reads
    # the shared global weights (no per-client copy) and writes each client's own. A client
    # whose data ran out has zero loss weights, so a zero gradient, and stays put without a mask.
    fused = mlp is not None and mu == 0 and extra is None and not has_decay
    # The clients' weights, one contiguous (c, *shape) tensor per parameter, trained in place
    # (in-place batched matmuls on views of one (c, P) buffer measured 1.5x slower). Not
    # `clone()`: cloning the expanded (stride 0) `w0` measured 5x slower than `copy_`.
    shared = flat0.stride(0) == 0  # every task starts from the same `Params`
    w = (
        list(w0)
        if fused and shared
        else [torch.empty(v.shape, dtype=dtype, device=device).copy_(v) for v in w0]
    )
    losses: list[torch.Tensor] = []
    replica.train()
    for s in range(steps):
        xb, yb = x[s], y[s]
        if fused:
            assert mlp is not None
            params = dict(zip(keys, w, strict=True))
            stepped, loss = mlp_step(mlp, params, xb, yb, weight[s], lr, workspace)
            w = [stepped[k] for k in keys]
            losses.append(loss)
            continue
        grads_d, loss = step_fn(dict(zip(keys, w, strict=True)), xb, yb, weight[s])
        grads = [grads_d[k] for k in keys]
        losses.append(loss)
        if mu > 0:
            torch._foreach_add_(grads, torch._foreach_sub(w, w0), alpha=mu)
        if extra is not None:
            torch._foreach_add_(grads, extra)
        if has_decay:
            torch._foreach_add_(grads, torch._foreach_mul(w, [_per_row(decay, g) for g in grads]))
        if not all_alive[s]:
            torch._foreach_mul_(grads, [_per_row(alive[s], g) for g in grads])
        torch._foreach_add_(w, grads, alpha=-lr)
    loss_sums = (torch.stack(losses).double() * counted).sum(0)
    deltas = torch.empty(flat0.shape, dtype=dtype, device=device)  # a row per client
    for v, v0, (a, b, shape) in zip(w, w0, state.spans, strict=True):
        torch.sub(v, v0, out=deltas[:, a:b].view(c, *shape))  # one pass per parameter
    deltas_np = deltas.cpu().numpy()
    train_loss = (loss_sums.cpu() / torch.tensor(sizes, dtype=torch.float64)).tolist()
    updates = []
    for i, task in enumerate(tasks):
        flat = task.params.flat
        delta = np.asarray(deltas_np[i], dtype=flat.dtype)
        metrics = {"train_loss": float(train_loss[i])}
        taken = epochs * per_epoch[i]
        updates.append(Update(task.params.with_flat(delta), sizes[i], taken, metrics))
    return updates
