"""Validation of client updates and streaming, example-weighted aggregation.

Memory grows with the model, not with the number of clients: `StreamingMean` keeps one running
sum per vector and folds each update in as it arrives.
"""

from __future__ import annotations

import math

import numpy as np

from fedloom.algorithms.base import Aggregate
from fedloom.core import blas
from fedloom.core.params import Layout, Params
from fedloom.core.types import Metrics, Update


def check_update(update: object, layout: Layout, extras: dict[str, Layout]) -> str | None:
    """Return why `update` cannot be aggregated against `layout`, or None if it can.

    Checks, in order: the type, `num_examples` (a positive int), the delta's names, shapes and
    dtype, finiteness, and the same for every expected extra (and no unexpected extras).
    """
    if not isinstance(update, Update):
        return f"returned {type(update).__name__}, not an Update"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    if not isinstance(update.delta, Params):
        return f"delta is {type(update.delta).__name__}, not Params"
    reason = layout.describe_mismatch(update.delta.layout)
    if reason is not None:
        return f"delta: {reason}"
    if not update.delta.is_finite():
        return "delta contains NaN or Inf"
    missing = sorted(set(extras) - set(update.extras))
    if missing:
        return f"missing extra(s) {', '.join(missing)}"
    unexpected = sorted(set(update.extras) - set(extras))
    if unexpected:
        return f"unexpected extra(s) {', '.join(unexpected)}"
    for name, extra_layout in extras.items():
        value = update.extras[name]
        if not isinstance(value, Params):
            return f"extra {name!r} is {type(value).__name__}, not Params"
        reason = extra_layout.describe_mismatch(value.layout)
        if reason is not None:
            return f"extra {name!r}: {reason}"
        if not value.is_finite():
            return f"extra {name!r} contains NaN or Inf"
    for key, metric in update.metrics.items():
        if not isinstance(metric, int | float) or not math.isfinite(metric):
            return f"metric {key!r} is not a finite number ({metric!r})"
    return None


class StreamingMean:
    """Running example-weighted mean of deltas, unweighted mean of extras.

    Contract: call `add` once per accepted update (already validated with `check_update`), then
    `result()` once. Metrics are averaged weighted by examples. Memory: one buffer per vector.
    """

    def __init__(self, layout: Layout, extras: dict[str, Layout] | None = None) -> None:
        self._delta = Params.zeros(layout)
        self._extras = {name: Params.zeros(lay) for name, lay in (extras or {}).items()}
        self._metrics: dict[str, float] = {}
        self._scratch = np.empty(layout.size, dtype=layout.dtype)
        self._clients = 0
        self._examples = 0

    @property
    def num_clients(self) -> int:
        """Updates folded in so far."""
        return self._clients

    def add(self, update: Update) -> None:
        """Fold in one update."""
        weight = update.num_examples
        acc, delta = self._delta.flat, update.delta.flat
        axpy = blas.axpy(acc.dtype)  # one pass; 4-7x NumPy's multiply + add on 1.7M
        if axpy is not None and delta.dtype == acc.dtype and delta.flags.c_contiguous:
            if axpy(delta, acc, a=weight) is not acc:  # in place for a contiguous acc
                raise AssertionError("BLAS axpy did not update the accumulator in place")
        else:  # float16, or an unusual buffer: two NumPy passes
            np.multiply(delta, weight, out=self._scratch)
            np.add(acc, self._scratch, out=acc)
        for name, extra in self._extras.items():
            np.add(extra.flat, update.extras[name].flat, out=extra.flat)
        for key, value in update.metrics.items():
            self._metrics[key] = self._metrics.get(key, 0.0) + weight * float(value)
        self._clients += 1
        self._examples += weight

    def result(self) -> Aggregate:
        """The means so far. Raises ValueError if nothing was added."""
        if self._clients == 0:
            raise ValueError("no updates were aggregated")
        np.multiply(self._delta.flat, 1.0 / self._examples, out=self._delta.flat)
        for acc in self._extras.values():
            np.multiply(acc.flat, 1.0 / self._clients, out=acc.flat)
        metrics: Metrics = {k: v / self._examples for k, v in self._metrics.items()}
        return Aggregate(
            delta=self._delta,
            num_clients=self._clients,
            num_examples=self._examples,
            extras=self._extras,
            metrics=metrics,
        )
