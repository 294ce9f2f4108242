"""Client-half state over gRPC: a round the server discards leaves no trace on its clients."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from participants import participants
from toy import Toy, federation_of, initial

from fedloom.algorithms import Scaffold, ScaffoldLocal
from fedloom.certs import write_test_pki
from fedloom.core.params import Params
from fedloom.core.types import FitConfig, Task, TaskKind, Update
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.participant import StateHistory
from fedloom.runtime.remote import GrpcTransport


def test_a_retried_scaffold_round_over_grpc_equals_the_simulation(tmp_path: Path) -> None:
    """Client c02 fails its first task, so round 1's first attempt has 2 of the 3 updates it
    needs and is retried: the control variates c00 and c01 computed in that attempt must not
    survive into the retry, as they do not in simulation (the federation restores them)."""
    pki = write_test_pki(tmp_path, clients=["c00", "c01", "c02"])
    settings = Settings(
        rounds=3, fraction_fit=1.0, min_fit_clients=3, max_retries=1, learning_rate=0.05
    )
    with (
        GrpcTransport(
            server_cert=pki.server_cert.read_bytes(),
            server_key=pki.server_key.read_bytes(),
            client_ca=pki.ca.read_bytes(),
            log=lambda _: None,
        ) as transport,
        participants(transport.address, federation_of(3, modes={2: "flaky"}), pki),
    ):
        ids = transport.wait_for_clients(3, timeout=10)
        remote = Federation(Scaffold(num_clients=3), transport, ids, settings).run(initial())
    assert remote.history[0].num_selected == 6  # two attempts of three clients
    simulated = Federation.simulation(
        Scaffold(num_clients=3), federation_of(3, modes={2: "flaky"}), settings
    ).run(initial())
    assert simulated.history[0].num_selected == 6
    np.testing.assert_allclose(remote.state.params.flat, simulated.state.params.flat, atol=1e-6)
    np.testing.assert_allclose(
        remote.state.slots["control"].flat, simulated.state.slots["control"].flat, atol=1e-6
    )


def test_the_state_history_starts_each_round_from_the_latest_earlier_round() -> None:
    history = StateHistory(keep=2)
    assert history.before(1) == {}
    history.record(1, {"c": "after 1"})
    history.record(3, {"c": "after 3"})
    assert history.before(3) == {"c": "after 1"}  # round 3 again: its first run is forgotten
    assert history.before(4) == {"c": "after 3"}
    history.record(4, {"c": "after 4"})
    assert history.before(9) == {"c": "after 4"} and history.before(4) == {"c": "after 3"}
    assert history.before(3) == {}  # only the last 2 rounds are kept


class SlowFirstRound(Toy):
    """A toy client whose round-1 fit outlasts the server's deadline."""

    def fit(self, params: Params, config: FitConfig) -> Update:
        if config.round == 1:
            time.sleep(1.5)
        return super().fit(params, config)


def test_a_straggler_forgets_the_state_of_the_round_that_did_not_use_its_reply(
    tmp_path: Path,
) -> None:
    """Round 1's SCAFFOLD reply comes after the deadline and is discarded; the client's round-2
    update must then start from no control variate, as if round 1 had never run there."""
    pki = write_test_pki(tmp_path, clients=["c00"])
    base = federation_of(1)["c00"]
    slow = {"c00": SlowFirstRound(base.target, base.num_train_examples)}
    with (
        GrpcTransport(
            server_cert=pki.server_cert.read_bytes(),
            server_key=pki.server_key.read_bytes(),
            client_ca=pki.ca.read_bytes(),
            timeout=0.5,
            log=lambda _: None,
        ) as transport,
        participants(transport.address, slow, pki),
    ):
        transport.wait_for_clients(1, timeout=10)
        control = {"control": initial() * 0.1}
        fit = FitConfig(round=1, learning_rate=0.05)
        task = Task("c00", TaskKind.FIT, initial(), fit, None, control)
        (first,) = transport.dispatch([task], ScaffoldLocal())
        assert first.failure is not None and "straggler" in first.failure.reason
        transport.timeout = 20.0
        second_fit = FitConfig(round=2, learning_rate=0.05)
        task = Task("c00", TaskKind.FIT, initial() * 2.0, second_fit, None, control)
        (second,) = transport.dispatch([task], ScaffoldLocal())
    assert second.update is not None
    fresh = ScaffoldLocal().run(base, initial() * 2.0, second_fit, control, {})
    np.testing.assert_allclose(second.update.delta.flat, fresh.delta.flat, rtol=1e-6)
    np.testing.assert_allclose(
        second.update.extras["control_delta"].flat, fresh.extras["control_delta"].flat, rtol=1e-6
    )
