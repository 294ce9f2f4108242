"""Round policy for system heterogeneity: over-selection and order-independent aggregation.

Over-selection (Bonawitz et al. 2019, "Towards federated learning at scale") dispatches a
round's fit tasks to more clients than it needs and closes the round as soon as the target
number of updates has been accepted, so a few slow or dropped clients no longer hold it up.
Ordered aggregation folds a round's accepted updates in the order the clients were selected,
so the aggregate does not depend on the order a network delivers replies in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedloom.algorithms.base import Aggregate, ClientState
from fedloom.core.params import Layout
from fedloom.core.types import Update
from fedloom.runtime.aggregate import StreamingMean
from fedloom.runtime.selection import sample_size
from fedloom.runtime.transport import Transport


def over_select(
    available: Sequence[str],
    fraction: float,
    minimum: int,
    over_selection: float,
    rng: np.random.Generator,
) -> tuple[int, list[str]]:
    """The round's target and the clients to dispatch to, in drawn order.

    The target is n = `sample_size(len(available), fraction, minimum)` (as `select_clients`
    computes it); the draw is min(len(available), ceil(n * (1 + over_selection))) clients,
    uniformly without replacement from `rng`. With `over_selection = 0` the draw is exactly
    `select_clients(available, fraction, minimum, rng)` (same clients, same order, same use of
    `rng`). Raises `SelectionError` if fewer than `minimum` clients are available.
    """
    if not over_selection >= 0.0:
        raise ValueError(f"over_selection must be >= 0, got {over_selection!r}")
    target = sample_size(len(available), fraction, minimum)
    if target == 0:
        return 0, []
    size = min(len(available), math.ceil(target * (1.0 + over_selection) - 1e-9))
    picks = rng.choice(len(available), size=size, replace=False)
    return target, [available[int(i)] for i in picks]


class FitCollector:
    """The accepted updates of one fit attempt, for the clients `picked` (in task order).

    Contract: call `replied` for every reply the dispatch yields and `accept` for each one it
    let through that also passed validation; stop consuming the dispatch once `full`; then
    `unused()` names the dispatched clients whose replies never came, and `result()` (once,
    after at least one `accept`) is the example-weighted mean.

    With `ordered=False` updates are folded into a `StreamingMean` as they arrive (memory: one
    model-sized buffer). With `ordered=True` they are held until `result()` and folded in task
    order, so the aggregate is bit-identical whatever order the replies arrived in; memory then
    grows with the number of accepted clients (one update each, as the transport returned it).
    """

    def __init__(
        self,
        picked: Sequence[str],
        target: int,
        layout: Layout,
        extras: dict[str, Layout] | None = None,
        *,
        ordered: bool = False,
    ) -> None:
        self._position = {cid: i for i, cid in enumerate(picked)}
        if len(self._position) != len(picked):
            raise ValueError("picked client ids must be unique")
        self._picked = list(picked)
        self.target = target
        self._mean = StreamingMean(layout, extras)
        self._held: dict[int, Update] | None = {} if ordered else None
        self._replied: set[str] = set()
        self._accepted = 0

    @property
    def num_accepted(self) -> int:
        """Updates accepted so far."""
        return self._accepted

    @property
    def full(self) -> bool:
        """True once `target` updates were accepted: the round may close."""
        return self._accepted >= self.target

    def replied(self, client_id: str) -> str | None:
        """Note that `client_id`'s reply came; return why it cannot be accepted (a client not
        picked for this attempt, or a second reply from one), else None."""
        if client_id not in self._position:
            return "reply from a client not selected for this round"
        if client_id in self._replied:
            return "a second reply in one round"
        self._replied.add(client_id)
        return None

    def accept(self, client_id: str, update: Update) -> None:
        """Count one validated update of a picked client whose reply `replied` let through
        (folded now, or held if ordered)."""
        if self._held is None:
            self._mean.add(update)
        else:
            self._held[self._position[client_id]] = update
        self._accepted += 1

    def unused(self) -> list[str]:
        """The picked clients (in task order) that no reply was seen from."""
        return [cid for cid in self._picked if cid not in self._replied]

    def result(self) -> Aggregate:
        """The example-weighted mean of the accepted updates (see `StreamingMean.result`)."""
        if self._held is not None:
            for position in sorted(self._held):
                self._mean.add(self._held[position])
            self._held.clear()
        return self._mean.result()


def restore_states(
    transport: Transport, client_ids: Sequence[str], before: dict[str, ClientState]
) -> None:
    """Give `client_ids` back the client-half states `before` holds for them (no state where
    `before` has none), touching the transport only if one of them changed. States are
    replaced, never mutated (the `LocalAlgorithm` contract), so `before` may hold references."""
    current = transport.client_states()
    changed = [cid for cid in client_ids if current.get(cid) is not before.get(cid)]
    if not changed:
        return
    states = dict(current)
    for cid in changed:
        if cid in before:
            states[cid] = before[cid]
        else:
            states.pop(cid, None)
    transport.restore_client_states(states)
