"""Privacy accounting for client-level DP-FedAvg, built on Google's `dp_accounting`.

One round of client-level DP-FedAvg samples clients, clips each client's update to L2 norm
`clip`, sums the clipped updates and adds Gaussian noise of standard deviation
`noise_multiplier * clip` to the sum. In `dp_accounting` terms a round is

- Poisson sampling (each client independently with probability q):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, for neighbouring populations that differ by
  adding or removing one client;
- fixed-size sampling (exactly m of n clients, without replacement):
  ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z))``, for neighbouring populations
  that differ by replacing one client (the only relation `dp_accounting` supports for it).

Backends: ``"rdp"`` (`dp_accounting.rdp.RdpAccountant`) supports both sampling kinds;
``"pld"`` (`dp_accounting.pld.PLDAccountant`) is tighter but supports Poisson sampling only.
Asking PLD for fixed-size sampling raises `UnsupportedMechanismError`, which names the event
and the backend. Each query composes the rounds recorded so far into a fresh `dp_accounting`
accountant, so repeated identical rounds cost one self-composition, not one per round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, Literal, get_args

import dp_accounting  # type: ignore[import-untyped]

SamplingKind = Literal["poisson", "fixed"]
Backend = Literal["rdp", "pld"]

#: Smallest noise multiplier `calibrate_noise` searches; below it PLD gets very expensive.
MIN_NOISE_MULTIPLIER = 2.0**-6
#: Largest noise multiplier `calibrate_noise` searches.
MAX_NOISE_MULTIPLIER = 2.0**12


class UnsupportedMechanismError(ValueError):
    """The chosen backend cannot account for this mechanism's `DpEvent`."""


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_backend(backend: str) -> None:
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {get_args(Backend)}, got {backend!r}")


def _check_sampling(sampling: str, clients_per_round: int, population: int) -> None:
    if sampling not in get_args(SamplingKind):
        raise ValueError(f"sampling must be one of {get_args(SamplingKind)}, got {sampling!r}")
    _check_int("population", population, 1)
    _check_int("clients_per_round", clients_per_round, 1)
    if clients_per_round > population:
        raise ValueError(
            f"clients_per_round ({clients_per_round}) must be <= population ({population})"
        )


def _round_event(z: float, sampling: SamplingKind, clients: int, population: int) -> Any:
    gaussian = dp_accounting.GaussianDpEvent(z)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(clients / population, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(population, clients, gaussian)


def _relation(sampling: SamplingKind) -> Any:
    rel = dp_accounting.NeighboringRelation
    return rel.ADD_OR_REMOVE_ONE if sampling == "poisson" else rel.REPLACE_ONE


def _fresh(backend: Backend, sampling: SamplingKind, pld_discretization: float) -> Any:
    if backend == "rdp":
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=_relation(sampling))
    return dp_accounting.pld.PLDAccountant(
        neighboring_relation=_relation(sampling),
        value_discretization_interval=pld_discretization,
    )


def _require_support(accountant: Any, event: Any, backend: Backend) -> None:
    if not accountant.supports(event):
        raise UnsupportedMechanismError(
            f"backend {backend!r} cannot account for {type(event).__name__} ({event}); "
            "use backend='rdp' for fixed-size sampling"
        )


@dataclass(frozen=True)
class DpFedAvgMechanism:
    """One round of client-level DP-FedAvg with Gaussian noise on the sum of clipped updates.

    `noise_multiplier` is z: the noise standard deviation is `z * clip` on the sum. `sampling`
    is ``"poisson"`` (each of `population` clients joins independently with probability
    `clients_per_round / population`) or ``"fixed"`` (exactly `clients_per_round` of
    `population` clients, uniformly without replacement). `delta` is the delta at which
    epsilon is reported. Construction raises `ValueError` naming the first bad field.
    """

    noise_multiplier: float
    sampling: SamplingKind
    clients_per_round: int
    population: int
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        _check_sampling(self.sampling, self.clients_per_round, self.population)
        _check_delta(self.delta)
        # plain Python scalars, so events compare equal and reports serialise as JSON
        for name, kind in (("noise_multiplier", float), ("delta", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        for name in ("clients_per_round", "population"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def sampling_rate(self) -> float:
        """The nominal per-round sampling rate `clients_per_round / population`, in (0, 1]."""
        return self.clients_per_round / self.population

    @property
    def neighboring_relation(self) -> str:
        """``"add_or_remove_one"`` for Poisson sampling, ``"replace_one"`` for fixed-size."""
        return "add_or_remove_one" if self.sampling == "poisson" else "replace_one"

    def round_event(self) -> Any:
        """The `dp_accounting.DpEvent` of one nominal round of this mechanism."""
        return _round_event(
            self.noise_multiplier, self.sampling, self.clients_per_round, self.population
        )


@dataclass(frozen=True)
class PrivacyReport:
    """What a run spent: mechanism, clip, noise, sampling, rounds and (epsilon, delta).

    `clip_norm` is None when clipping was adaptive. `sampling_rate` is the nominal rate.
    `as_dict` gives a JSON-ready mapping; `str()` gives one line for the end of a run.
    """

    mechanism: str
    clip_norm: float | None
    noise_multiplier: float
    sampling: SamplingKind
    sampling_rate: float
    rounds: int
    epsilon: float
    delta: float
    backend: Backend
    neighboring_relation: str

    def as_dict(self) -> dict[str, str | int | float | None]:
        """The report as a flat dict of JSON scalars (field name -> value)."""
        return asdict(self)

    def __str__(self) -> str:
        clip = "adaptive" if self.clip_norm is None else f"{self.clip_norm:g}"
        return (
            f"privacy: {self.mechanism}, clip {clip}, noise multiplier "
            f"{self.noise_multiplier:.4g}, {self.sampling} sampling q={self.sampling_rate:.4g}, "
            f"{self.rounds} rounds -> epsilon {self.epsilon:.4g} at delta {self.delta:g} "
            f"({self.backend}, {self.neighboring_relation})"
        )


class Accountant:
    """Composes the DP-FedAvg rounds that actually ran and reports epsilon at the mechanism's delta.

    `backend` is ``"rdp"`` or ``"pld"``; `pld_discretization` is the PLD accountant's
    `value_discretization_interval` (smaller is tighter and slower; unused by RDP). Raises
    `UnsupportedMechanismError` at construction when the backend cannot account for the
    mechanism (PLD with fixed-size sampling), so a run refuses to start rather than fail later.
    """

    def __init__(
        self,
        mechanism: DpFedAvgMechanism,
        *,
        backend: Backend = "rdp",
        pld_discretization: float = 1e-4,
    ) -> None:
        _check_backend(backend)
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization!r}")
        self._mechanism = mechanism
        self._backend: Backend = backend
        self._pld_discretization = pld_discretization
        self._runs: list[tuple[Any, int]] = []  # (round event, consecutive count)
        self._epsilon: float | None = 0.0
        _require_support(self._new_accountant(), mechanism.round_event(), backend)

    @property
    def mechanism(self) -> DpFedAvgMechanism:
        """The mechanism whose rounds this accountant composes."""
        return self._mechanism

    @property
    def backend(self) -> Backend:
        """The `dp_accounting` backend: ``"rdp"`` or ``"pld"``."""
        return self._backend

    @property
    def rounds(self) -> int:
        """Number of rounds recorded so far."""
        return sum(count for _, count in self._runs)

    @property
    def dp_event(self) -> Any:
        """The composed `dp_accounting.DpEvent` of all recorded rounds (`NoOpDpEvent` if none).

        Composing it into a fresh accountant of the same backend and neighbouring relation
        reproduces `epsilon()`.
        """
        return self._compose_runs(self._runs)

    def record_round(self, *, population: int | None = None, sampled: int | None = None) -> None:
        """Compose one round that ran with the mechanism's noise multiplier.

        `population` is the number of clients eligible this round (default: the mechanism's).
        Fixed-size sampling: `sampled` is the number drawn without replacement (default: the
        mechanism's `clients_per_round`), 1 <= sampled <= population. Poisson sampling: the
        round is accounted at rate `clients_per_round / population`; the realised sample size
        `sampled` is only checked (0 <= sampled <= population), since a Poisson guarantee
        depends on the rate, not the draw. Raises `ValueError` naming a bad argument.
        """
        mech = self._mechanism
        n = _check_int("population", mech.population if population is None else population, 1)
        if mech.sampling == "poisson":
            if mech.clients_per_round > n:
                raise ValueError(
                    f"population ({n}) must be >= clients_per_round ({mech.clients_per_round}) "
                    "for Poisson sampling"
                )
            if sampled is not None:
                sampled = _check_int("sampled", sampled, 0)
                if sampled > n:
                    raise ValueError(f"sampled ({sampled}) must be <= population ({n})")
            m = mech.clients_per_round
        else:
            m = _check_int("sampled", mech.clients_per_round if sampled is None else sampled, 1)
            if m > n:
                raise ValueError(f"sampled ({m}) must be <= population ({n})")
        event = _round_event(mech.noise_multiplier, mech.sampling, m, n)
        if self._runs and self._runs[-1][0] == event:
            self._runs[-1] = (event, self._runs[-1][1] + 1)
        else:
            self._runs.append((event, 1))
        self._epsilon = None

    def epsilon(self) -> float:
        """Epsilon at the mechanism's delta for the rounds recorded so far (0.0 before any)."""
        if self._epsilon is None:
            self._epsilon = self._epsilon_of(self._runs)
        return self._epsilon

    def epsilon_after(self, extra_rounds: int) -> float:
        """Epsilon if `extra_rounds` more nominal rounds ran after those recorded (state unchanged).

        `extra_rounds` must be an int >= 0; `epsilon_after(0) == epsilon()`.
        """
        extra_rounds = _check_int("extra_rounds", extra_rounds, 0)
        if extra_rounds == 0:
            return self.epsilon()
        runs = list(self._runs)
        event = self._mechanism.round_event()
        if runs and runs[-1][0] == event:
            runs[-1] = (event, runs[-1][1] + extra_rounds)
        else:
            runs.append((event, extra_rounds))
        return self._epsilon_of(runs)

    def would_exceed(self, budget_epsilon: float, extra_rounds: int = 1) -> bool:
        """True when `extra_rounds` more nominal rounds would push epsilon above `budget_epsilon`.

        Call before each round and stop when it is True: the run then ends within budget.
        """
        if not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be > 0, got {budget_epsilon!r}")
        return self.epsilon_after(extra_rounds) > budget_epsilon

    def report(self, *, clip_norm: float | None, mechanism: str = "dp-fedavg") -> PrivacyReport:
        """A `PrivacyReport` of the rounds recorded so far (`clip_norm` None when adaptive).

        Raises `ValueError` naming `clip_norm` when it is given and not a positive number.
        """
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0 or None (adaptive), got {clip_norm!r}")
        mech = self._mechanism
        return PrivacyReport(
            mechanism=mechanism,
            clip_norm=None if clip_norm is None else float(clip_norm),
            noise_multiplier=mech.noise_multiplier,
            sampling=mech.sampling,
            sampling_rate=mech.sampling_rate,
            rounds=self.rounds,
            epsilon=self.epsilon(),
            delta=mech.delta,
            backend=self._backend,
            neighboring_relation=mech.neighboring_relation,
        )

    def _new_accountant(self) -> Any:
        return _fresh(self._backend, self._mechanism.sampling, self._pld_discretization)

    @staticmethod
    def _compose_runs(runs: list[tuple[Any, int]]) -> Any:
        if not runs:
            return dp_accounting.NoOpDpEvent()
        events = [dp_accounting.SelfComposedDpEvent(event, count) for event, count in runs]
        return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)

    def _epsilon_of(self, runs: list[tuple[Any, int]]) -> float:
        if not runs:
            return 0.0
        accountant = self._new_accountant().compose(self._compose_runs(runs))
        return float(accountant.get_epsilon(self._mechanism.delta))


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    sampling: SamplingKind,
    clients_per_round: int,
    population: int,
    backend: Backend = "rdp",
    tol: float = 1e-3,
    pld_discretization: float = 1e-4,
) -> float:
    """The smallest noise multiplier z (within `tol`) keeping `rounds` rounds within budget.

    Returns z with epsilon(z) <= `target_epsilon` at `delta` after `rounds` nominal rounds of
    DP-FedAvg with the given sampling, and |z - z*| <= `tol` where z* is the exact threshold
    (so epsilon(z - tol) >= `target_epsilon`). Uses `dp_accounting.calibrate_dp_mechanism`
    inside a bracket found by doubling/halving from z = 1, searching
    [`MIN_NOISE_MULTIPLIER`, `MAX_NOISE_MULTIPLIER`]. Raises `ValueError` naming a bad argument,
    including a target no z in that range reaches, and `UnsupportedMechanismError` for PLD with
    fixed-size sampling.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0 and finite, got {target_epsilon!r}")
    _check_delta(delta)
    _check_int("rounds", rounds, 1)
    _check_sampling(sampling, clients_per_round, population)
    _check_backend(backend)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if not pld_discretization > 0:
        raise ValueError(f"pld_discretization must be > 0, got {pld_discretization!r}")

    def make_accountant() -> Any:
        return _fresh(backend, sampling, pld_discretization)

    def make_event(z: float) -> Any:
        event = _round_event(z, sampling, clients_per_round, population)
        return dp_accounting.SelfComposedDpEvent(event, rounds)

    def within(z: float) -> bool:
        eps = make_accountant().compose(make_event(z)).get_epsilon(delta)
        return bool(eps <= target_epsilon)

    _require_support(make_accountant(), make_event(1.0), backend)
    lo, hi = 1.0, 1.0
    if within(hi):
        lo = hi / 2
        while within(lo):
            if lo <= MIN_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon {target_epsilon} is reached with noise multiplier "
                    f"{MIN_NOISE_MULTIPLIER}: too large to calibrate"
                )
            hi, lo = lo, lo / 2
    else:
        while not within(hi):
            if hi >= MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon {target_epsilon} needs a noise multiplier above "
                    f"{MAX_NOISE_MULTIPLIER}: too small to calibrate"
                )
            lo, hi = hi, hi * 2
    z = dp_accounting.calibrate_dp_mechanism(
        make_accountant,
        make_event,
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=tol,
    )
    return float(z)
