from pathlib import Path

import numpy as np
import pytest
from toy import federation_of, initial

from fedloom.algorithms import FedAvg, FedAvgM, Scaffold
from fedloom.core.params import Params
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, RoundFailed, RoundResult, Settings
from fedloom.runtime.transport import InProcessTransport
from fedloom.store import RunStore


def run(trainers, settings, strategy=None, **kw):  # type: ignore[no-untyped-def]
    fed = Federation(
        strategy or FedAvg(),
        InProcessTransport(ClientPool(trainers)),
        list(trainers),
        settings,
        **kw,
    )
    return fed.run(initial())


def test_fedavg_converges_to_the_weighted_optimum() -> None:
    trainers = federation_of(10)
    targets = np.array([t.target for t in trainers.values()])
    weights = np.array([t.num_train_examples for t in trainers.values()], dtype=float)
    optimum = (weights[:, None] * targets).sum(0) / weights.sum()
    result = run(trainers, Settings(rounds=30, fraction_fit=1.0, learning_rate=0.05, batch_size=5))
    assert np.abs(result.state.params.flat - optimum).max() < 0.15
    assert result.state.round == 30 and len(result.history) == 30


def test_bad_clients_are_rejected_with_reasons_and_the_round_goes_on() -> None:
    modes = {0: "raise", 1: "nan", 2: "shape", 3: "dtype", 4: "names"}
    trainers = federation_of(8, modes=modes)
    result = run(trainers, Settings(rounds=2, fraction_fit=1.0, min_fit_clients=3))
    record = result.history[0]
    reasons = {r.client_id: r.reason for r in record.rejections}
    assert "RuntimeError: disk on fire" in reasons["c00"]
    assert "NaN or Inf" in reasons["c01"]
    assert "shape (4,)" in reasons["c02"]
    assert "dtype float64" in reasons["c03"]
    assert "missing tensor(s) w" in reasons["c04"]
    assert record.num_accepted == 3
    assert {c.client_id for c in record.clients} == {"c05", "c06", "c07"}
    assert result.state.params.is_finite()


def test_too_few_valid_updates_retries_then_fails_clearly() -> None:
    trainers = federation_of(4, modes={0: "raise", 1: "raise", 2: "raise"})
    with pytest.raises(
        RoundFailed, match=r"round 1: 1 valid update\(s\), 2 needed, after 3 attempt"
    ):
        run(trainers, Settings(rounds=1, fraction_fit=1.0, min_fit_clients=2, max_retries=2))


def test_a_discarded_attempt_leaves_no_client_state_behind() -> None:
    """SCAFFOLD's invariant c == mean(c_i) (full participation from zero) survives a retry:
    the clients that trained in the discarded attempt get their old c_i back."""
    trainers = federation_of(4, modes={3: "flaky"})
    transport = InProcessTransport(ClientPool(trainers))
    settings = Settings(rounds=2, fraction_fit=1.0, min_fit_clients=4, max_retries=1)
    with Federation(Scaffold(num_clients=4), transport, list(trainers), settings) as fed:
        result = fed.run(initial())
    assert [r.num_accepted for r in result.history] == [4, 4]
    assert result.history[0].rejections[0].client_id == "c03"  # the retry really happened
    states = transport.client_states()
    mean_ci = np.mean([states[cid]["control"].flat for cid in trainers], axis=0)
    np.testing.assert_allclose(result.state.slots["control"].flat, mean_ci, atol=1e-6)


def test_unavailable_clients_are_never_selected() -> None:
    trainers = federation_of(10)
    seen: set[str] = set()
    result = run(
        trainers,
        Settings(rounds=5, fraction_fit=0.5),
        available=lambda r: [c for c in trainers if c not in ("c00", "c01")],
        on_round=lambda rr: seen.update(c.client_id for c in rr.record.clients),
    )
    assert seen and not seen & {"c00", "c01"}
    assert all(r.num_selected == 4 for r in result.history)


def test_target_metric_stops_early_and_evaluation_runs_both_ways() -> None:
    trainers = federation_of(6)
    central = {"calls": 0}

    def evaluate(p: Params) -> dict[str, float]:
        central["calls"] += 1
        return {"loss": float(np.abs(p.flat).sum())}

    result = run(
        trainers,
        Settings(
            rounds=50,
            fraction_fit=1.0,
            fraction_evaluate=0.5,
            target_metric="federated_loss",
            target_value=0.6,
            target_mode="min",
            learning_rate=0.05,
        ),
        evaluate_fn=evaluate,
    )
    assert result.stopped == "target"
    assert result.history[-1].metrics["federated_loss"] <= 0.6
    assert len(result.history) < 50 and central["calls"] == len(result.history)
    assert all("loss" in r.metrics and "train_loss" in r.metrics for r in result.history)


def test_settings_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"fraction_fit = 1\.5"):
        Settings(fraction_fit=1.5)
    with pytest.raises(ValueError, match="min_fit_clients = 20 exceeds the 3 clients"):
        Federation(
            FedAvg(),
            InProcessTransport(ClientPool(federation_of(3))),
            ["a", "b", "c"],
            Settings(min_fit_clients=20),
        )


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM(momentum=0.5), Scaffold(num_clients=10)])
def test_interrupted_run_resumes_to_the_same_model(tmp_path: Path, strategy) -> None:  # type: ignore[no-untyped-def]
    trainers = federation_of(10)
    settings = Settings(rounds=6, fraction_fit=0.3, learning_rate=0.05, seed=3)
    straight = run(trainers, settings, strategy)

    store = RunStore(tmp_path / "runs.sqlite")

    def stop_after_3(result: RoundResult) -> None:
        if result.record.round == 3:
            raise KeyboardInterrupt

    trainers2 = federation_of(10)
    fed = Federation(
        strategy,
        InProcessTransport(ClientPool(trainers2)),
        list(trainers2),
        settings,
        store=store,
        run_dir=tmp_path / "runs",
        on_round=stop_after_3,
    )
    with pytest.raises(KeyboardInterrupt):
        fed.run(initial())
    (run_id,) = [r.id for r in store.list_runs()]
    assert store.get_run(run_id).status == "interrupted"

    trainers3 = federation_of(10)  # a fresh process: nothing in memory survives
    fed = Federation(
        strategy,
        InProcessTransport(ClientPool(trainers3)),
        list(trainers3),
        settings,
        store=store,
        run_dir=tmp_path / "runs",
    )
    resumed = fed.resume(run_id)
    assert resumed.state.round == 6
    assert resumed.state.params.flat.tobytes() == straight.state.params.flat.tobytes()
    assert [r.round for r in store.rounds(run_id)] == [1, 2, 3, 4, 5, 6]
    assert store.get_run(run_id).status == "finished"
    assert resumed.model_path is not None and resumed.model_path.exists()
