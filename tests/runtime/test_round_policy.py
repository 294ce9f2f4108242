"""Round policy for system heterogeneity: over-selection, ordered aggregation, late replies."""

from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from toy import federation_of, initial

from fedloom.algorithms import FedAvg, Scaffold
from fedloom.algorithms.base import ClientState, LocalAlgorithm, Strategy
from fedloom.config import ConfigError, parse_config
from fedloom.core.types import Failure, Reply, Task
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, RunResult, Settings
from fedloom.runtime.processes import ProcessTransport
from fedloom.runtime.rounds import over_select
from fedloom.runtime.selection import client_seeds, round_rng, select_clients
from fedloom.runtime.transport import InProcessTransport, Transport
from fedloom.store import Rejection


class Wrapper:
    """A transport around another one; records every dispatch's tasks and yielded client ids."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.dispatched: list[list[Task]] = []
        self.yielded: list[list[str]] = []

    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        self.dispatched.append(list(tasks))
        self.yielded.append([])
        for reply in self.replies(tasks, local):
            self.yielded[-1].append(reply.client_id)
            yield reply

    def replies(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        return self.inner.dispatch(tasks, local)

    def late_replies(self) -> list[Reply]:
        return self.inner.late_replies()

    def client_states(self) -> dict[str, ClientState]:
        return self.inner.client_states()

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        self.inner.restore_client_states(states)

    def close(self) -> None:
        self.inner.close()


class Reversed(Wrapper):
    """Delivers a dispatch's replies in reverse task order, as a network might."""

    def replies(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        return reversed(list(self.inner.dispatch(tasks, local)))


class Repeating(Wrapper):
    """Yields the first reply of every dispatch twice, and one for a client never asked."""

    def replies(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        replies = list(self.inner.dispatch(tasks, local))
        return iter([replies[0], *replies, Reply("stranger", replies[0].update)])


class Late(Wrapper):
    """Reports `late` from its late_replies at the `at`-th call (1-based), nothing otherwise."""

    def __init__(self, inner: Transport, late: list[Reply], at: int) -> None:
        super().__init__(inner)
        self.late, self.at, self.calls = late, at, 0

    def late_replies(self) -> list[Reply]:
        self.calls += 1
        return list(self.late) if self.calls == self.at else []


def run(
    transport: Transport, settings: Settings, strategy: Strategy | None = None, n: int = 20
) -> RunResult:
    ids = list(federation_of(n))
    with Federation(strategy or FedAvg(), transport, ids, settings) as fed:
        return fed.run(initial())


def inproc(n: int = 20, modes: dict[int, str] | None = None) -> InProcessTransport:
    return InProcessTransport(ClientPool(federation_of(n, modes=modes)))


# -- over-selection -------------------------------------------------------------------------------
def test_over_select_sizes_round_up_without_float_noise_and_cap_at_available() -> None:
    ids = [f"c{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    assert [len(over_select(ids, 0.25, 1, x, rng)[1]) for x in (0.0, 0.3, 0.35, 1.0)] == [
        10,
        13,  # 10 * 1.3 is 13.000000000000002 in floating point
        14,
        20,
    ]
    target, picked = over_select(ids[:12], 0.5, 1, 2.0, rng)
    assert target == 6 and sorted(picked) == sorted(ids[:12])


@pytest.mark.parametrize("seed", range(5))
def test_over_select_with_zero_draws_exactly_what_select_clients_draws(seed: int) -> None:
    ids = [f"c{i}" for i in range(37)]
    for fraction, minimum in ((0.1, 1), (0.3, 5), (1.0, 2)):
        target, picked = over_select(ids, fraction, minimum, 0.0, round_rng(seed, 3, 1))
        assert picked == select_clients(ids, fraction, minimum, round_rng(seed, 3, 1))
        assert target == len(picked)


def test_over_selection_zero_dispatches_the_plain_selection_with_the_same_seeds() -> None:
    transport = Wrapper(inproc())
    settings = Settings(rounds=3, fraction_fit=0.2, seed=4)
    result = run(transport, settings)
    ids = list(federation_of(20))
    for number, tasks in enumerate(transport.dispatched, start=1):
        picked = select_clients(ids, 0.2, 1, round_rng(4, number, 0))
        assert [t.client_id for t in tasks] == picked
        seeds = client_seeds(4, number, [ids.index(c) for c in picked])
        assert [t.fit.seed for t in tasks if t.fit is not None] == seeds
    assert all(r.num_selected == 4 and r.num_accepted == 4 for r in result.history)
    assert all(not r.rejections for r in result.history)


def test_the_round_closes_at_its_target_and_records_the_unused_clients() -> None:
    transport = Wrapper(inproc())
    settings = Settings(rounds=2, fraction_fit=0.25, over_selection=0.4, seed=1)
    result = run(transport, settings)
    ids = list(federation_of(20))
    for number, record in enumerate(result.history, start=1):
        tasks = transport.dispatched[number - 1]
        target, picked = over_select(ids, 0.25, 1, 0.4, round_rng(1, number, 0))
        assert (target, len(picked)) == (5, 7)
        assert [t.client_id for t in tasks] == picked
        # same per-client seeds as if each had been selected alone
        seeds = client_seeds(1, number, [ids.index(c) for c in picked])
        assert [t.fit.seed for t in tasks if t.fit is not None] == seeds
        assert transport.yielded[number - 1] == picked[:5]  # stopped consuming at the target
        assert record.num_selected == 7 and record.num_accepted == 5
        assert [c.client_id for c in record.clients] == picked[:5]
        why = "over-selected: the round closed with 5 updates"
        assert list(record.rejections) == [Rejection(cid, why) for cid in picked[5:]]


def test_over_selection_fills_in_for_failing_clients() -> None:
    ids = list(federation_of(10))
    target, picked = over_select(ids, 0.5, 1, 0.4, round_rng(0, 1, 0))
    assert (target, len(picked)) == (5, 7)
    broken = {ids.index(picked[1]): "raise"}
    transport = Wrapper(inproc(10, broken))
    result = run(transport, Settings(rounds=1, fraction_fit=0.5, over_selection=0.4), n=10)
    (record,) = result.history
    assert record.num_accepted == 5
    assert [c.client_id for c in record.clients] == [picked[0], *picked[2:6]]
    reasons = {r.client_id: r.reason for r in record.rejections}
    assert reasons.keys() == {picked[1], picked[6]}
    assert "disk on fire" in reasons[picked[1]]
    assert reasons[picked[6]] == "over-selected: the round closed with 5 updates"


def test_a_round_short_of_its_target_still_succeeds_with_replies_needed() -> None:
    ids = list(federation_of(10))
    _, picked = over_select(ids, 0.5, 4, 0.2, round_rng(0, 1, 0))
    broken = {ids.index(cid): "raise" for cid in picked[:3]}  # 6 dispatched, 3 fail
    settings = Settings(
        rounds=1, fraction_fit=0.5, min_fit_clients=4, min_replies=2, over_selection=0.2
    )
    result = run(inproc(10, broken), settings, n=10)
    (record,) = result.history
    assert record.num_selected == 6 and record.num_accepted == 3
    assert [r.client_id for r in record.rejections] == picked[:3]
    assert not any("over-selected" in r.reason for r in record.rejections)


@pytest.mark.parametrize("strategy", [FedAvg(), Scaffold(num_clients=12)])
def test_worker_processes_with_over_selection_equal_the_in_process_run(strategy: Strategy) -> None:
    """The workers' abandoned tasks are drained before the next round, and clients whose
    updates the closed round did not use keep their old client-half state (SCAFFOLD)."""
    settings = Settings(
        rounds=4, fraction_fit=0.25, over_selection=0.7, fraction_evaluate=0.3, learning_rate=0.05
    )
    a = inproc(12)
    b = ProcessTransport(ClientPool(federation_of(12)), workers=2)
    ra, rb = run(a, settings, strategy, n=12), run(b, settings, strategy, n=12)
    assert ra.state.params.flat.tobytes() == rb.state.params.flat.tobytes()
    for name, slot in ra.state.slots.items():
        assert slot.flat.tobytes() == rb.state.slots[name].flat.tobytes()
    assert [r.rejections for r in ra.history] == [r.rejections for r in rb.history]
    assert any(r.rejections for r in ra.history)
    sa, sb = a.client_states(), b.client_states()
    assert {c for c, s in sa.items() if s} == {c for c, s in sb.items() if s}
    for cid, state in sa.items():
        for name, value in state.items():
            assert value.flat.tobytes() == sb[cid][name].flat.tobytes()


def test_a_repeated_or_unasked_reply_is_a_rejection_not_a_second_update() -> None:
    transport = Repeating(inproc())
    result = run(transport, Settings(rounds=1, fraction_fit=0.2, ordered_aggregation=True))
    (record,) = result.history
    first = transport.dispatched[0][0].client_id
    assert record.num_accepted == 4 == len(record.clients)
    assert list(record.rejections) == [
        Rejection(first, "a second reply in one round"),
        Rejection("stranger", "reply from a client not selected for this round"),
    ]
    plain = run(inproc(), Settings(rounds=1, fraction_fit=0.2))
    assert result.state.params.flat.tobytes() == plain.state.params.flat.tobytes()


# -- ordered aggregation --------------------------------------------------------------------------
def final_bytes(transport: Transport, ordered: bool) -> bytes:
    settings = Settings(rounds=3, fraction_fit=1.0, learning_rate=0.3, ordered_aggregation=ordered)
    return run(transport, settings, n=9).state.params.flat.tobytes()


def test_ordered_aggregation_makes_the_result_independent_of_arrival_order() -> None:
    reference = final_bytes(inproc(9), ordered=False)
    assert final_bytes(inproc(9), ordered=True) == reference
    assert final_bytes(Reversed(inproc(9)), ordered=True) == reference
    # without it, float addition in another order differs in the last bits
    assert final_bytes(Reversed(inproc(9)), ordered=False) != reference


# -- late replies ---------------------------------------------------------------------------------
def test_late_replies_are_recorded_as_rejections_of_the_current_round() -> None:
    late = [
        Reply("c03", failure=Failure("c03", "no reply within 5 s"), bytes_up=100),
        Reply("c07", bytes_up=50),
    ]
    settings = Settings(rounds=2, fraction_fit=0.5, fraction_evaluate=0.5)
    plain = run(inproc(), settings)
    # calls: round 1 fit, round 1 evaluate, round 2 fit, ...: report them at round 1's evaluate
    result = run(Late(inproc(), late, at=2), settings)
    first, second = result.history
    assert first.rejections[-2:] == (
        Rejection("c03", "discarded: no reply within 5 s"),
        Rejection("c07", "late reply discarded"),
    )
    assert first.rejections[:-2] == plain.history[0].rejections
    assert first.bytes_up == plain.history[0].bytes_up + 150
    assert second.rejections == plain.history[1].rejections
    assert first.num_accepted == plain.history[0].num_accepted
    assert result.state.params.flat.tobytes() == plain.state.params.flat.tobytes()


def test_late_replies_are_asked_for_after_every_dispatch() -> None:
    transport = Late(inproc(), [], at=0)
    run(transport, Settings(rounds=3, fraction_fit=0.5, fraction_evaluate=0.5))
    assert transport.calls == 6  # one fit and one evaluate dispatch per round


# -- settings and config --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_bad_over_selection_is_refused_naming_the_key(value: float) -> None:
    with pytest.raises(ValueError, match=r"^over_selection = .*must be a finite number >= 0"):
        Settings(over_selection=value)
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"over_selection": value}})
    assert err.value.key == "federation.over_selection"
    assert "must be a finite number >= 0" in err.value.why


def test_config_sets_the_round_policy_keys() -> None:
    config = parse_config({"federation": {"over_selection": 0.3, "ordered_aggregation": True}})
    assert config.federation.over_selection == 0.3
    assert config.federation.ordered_aggregation is True
    assert parse_config({"federation": {"over_selection": 1}}).federation.over_selection == 1.0
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"ordered_aggregation": 1}})
    assert err.value.key == "federation.ordered_aggregation"
    assert "expected bool" in err.value.why
