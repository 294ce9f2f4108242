"""`Settings`: how a federation runs (rounds, sampling, local training, evaluation, stopping,
round policy), validated on construction; `[federation]` in a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Settings:
    """How a federation runs: rounds, sampling, local training, evaluation and stopping.

    Selection per round draws max(`min_fit_clients`, ceil(`fraction_fit` * available)) clients;
    the round succeeds when at least `min_replies` (default `min_fit_clients`) updates are
    accepted, else it is retried up to `max_retries` times with a fresh draw, then fails.
    Training stops after `rounds` rounds or when round metric `target_metric` reaches
    `target_value` (">=" for mode "max", "<=" for "min").

    System heterogeneity: with `over_selection = x > 0` a round's fit tasks go to
    ceil(n * (1 + x)) clients (at most all available ones), n being the selection above, and the
    round closes as soon as n updates were accepted; the dispatched clients whose replies were
    not used are recorded as rejections ("over-selected: ..."). With `ordered_aggregation`
    accepted updates are folded in selection order rather than arrival order, so the aggregate
    of the same accepted updates is bit-identical whatever order a transport delivers them in
    (with over-selection, which updates come first still decides which are accepted); they are
    held in memory until the round closes (one per accepted client). Client records stay in
    arrival order either way.
    """

    rounds: int = 10
    fraction_fit: float = 0.1
    min_fit_clients: int = 1
    min_replies: int | None = None
    max_retries: int = 1
    epochs: int = 1
    batch_size: int = 10
    learning_rate: float = 0.01
    fraction_evaluate: float = 0.0
    min_evaluate_clients: int = 0
    evaluate_every: int = 1
    seed: int = 0
    target_metric: str | None = None
    target_value: float | None = None
    target_mode: Literal["max", "min"] = "max"
    keep_checkpoints: int = 2
    over_selection: float = 0.0
    ordered_aggregation: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.rounds >= 1, "rounds", "must be at least 1"),
            (0.0 < self.fraction_fit <= 1.0, "fraction_fit", "must be in (0, 1]"),
            (self.min_fit_clients >= 1, "min_fit_clients", "must be at least 1"),
            (self.max_retries >= 0, "max_retries", "must be >= 0"),
            (self.epochs >= 1, "epochs", "must be at least 1"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate", "must be in [0, 1]"),
            (self.min_evaluate_clients >= 0, "min_evaluate_clients", "must be >= 0"),
            (self.evaluate_every >= 1, "evaluate_every", "must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1"),
            (
                0.0 <= self.over_selection < math.inf,
                "over_selection",
                "must be a finite number >= 0 (0.3 dispatches 30% more clients than needed)",
            ),
            (
                self.min_replies is None or 1 <= self.min_replies <= self.min_fit_clients,
                "min_replies",
                "must be between 1 and min_fit_clients",
            ),
            (
                (self.target_metric is None) == (self.target_value is None),
                "target_value",
                "target_metric and target_value must be set together",
            ),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"{key} = {getattr(self, key)!r}: {why}")

    @property
    def replies_needed(self) -> int:
        """Accepted updates a round needs."""
        return self.min_replies if self.min_replies is not None else self.min_fit_clients
