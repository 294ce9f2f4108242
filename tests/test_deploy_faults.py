"""Faults in a real deployment: `fedloom server` and `fedloom client` processes on 127.0.0.1
with per-client certificates; clients and the server are killed with SIGKILL mid-round, and
clients are refused (no certificate, another CA, not enrolled, revoked)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deploy_helpers import Failing, Idle, Proc, Procs, free_port, procs, wait_until
from fedloom.certs import write_test_pki
from fedloom.cli import main
from fedloom.config import ConfigError, RunConfig, load_config
from fedloom.core.params import Params
from fedloom.core.trainer import Trainer
from fedloom.deploy import lock_store, plan_run
from fedloom.experiment import build_strategy, build_trainers, prepared_clients
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.participant import ParticipantError, run_participant
from fedloom.store import RoundRecord, RunStore, RunStoreError, load_model

DIGITS = """\
name = "{name}"
[data]
dataset = "digits"
partition = "iid"
num_clients = {clients}
[federation]
rounds = {rounds}
fraction_fit = 1.0
min_fit_clients = {clients}
min_replies = {min_replies}
learning_rate = 0.1
batch_size = 16
"""


def _config(tmp_path: Path, name: str, clients: int, rounds: int, min_replies: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        DIGITS.format(name=name, clients=clients, rounds=rounds, min_replies=min_replies)
    )
    return path


def _simulated(config: RunConfig, gone: tuple[str, ...] = ()) -> Params:
    """The final model of `config` simulated in this process; the clients in `gone` fail every
    fit (as clients that died do)."""
    trainers, initial, _ = build_trainers(config.model, prepared_clients(config))
    sim: dict[str, Trainer] = {cid: Failing(t) if cid in gone else t for cid, t in trainers.items()}
    strategy = build_strategy(config.strategy, len(sim))
    with Federation.simulation(strategy, sim, config.federation) as federation:
        return federation.run(initial).state.params


@pytest.fixture
def group() -> Iterator[Procs]:
    with procs() as started:
        yield started


def _server(group: Procs, config: Path, tmp_path: Path, address: str, *extra: str) -> Proc:
    server = group.start(
        "server", "--config", str(config), "--address", address,
        "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "runs.sqlite"),
        "--quiet", "--wait", "60", "--round-timeout", "60", *extra,
    )  # fmt: skip
    server.wait_for("listening on 127.0.0.1:")
    return server


def _paced_client(
    group: Procs, address: str, tmp_path: Path, config: Path, cid: str, **env: str
) -> Proc:
    return group.start(
        "client", "--server", address, "--certs", str(tmp_path / "certs"),
        "--client-id", cid, "--trainer", "deploy_helpers:paced",
        env={"FEDLOOM_TEST_CONFIG": str(config), "FEDLOOM_TEST_MARKERS": str(tmp_path), **env},
    )  # fmt: skip


# -- a third of the clients die mid-round -------------------------------------------------------
def test_clients_killed_mid_round_are_rejections_and_the_run_goes_on(
    group: Procs, tmp_path: Path
) -> None:
    ids = [f"client-{k}" for k in range(6)]
    gone = ("client-1", "client-4")
    write_test_pki(tmp_path / "certs", clients=ids)
    config_file = _config(tmp_path, "six", clients=6, rounds=3, min_replies=4)
    server = _server(group, config_file, tmp_path, "127.0.0.1:0")
    address = server.wait_for("listening on").rsplit(" ", 1)[-1].strip()
    clients = {
        cid: _paced_client(
            group,
            address,
            tmp_path,
            config_file,
            cid,
            **({"FEDLOOM_TEST_STUCK": "1"} if cid in gone else {}),
        )
        for cid in ids
    }
    server.wait_for("6 clients connected")
    wait_until(lambda: all((tmp_path / f"{cid}-r1").exists() for cid in gone), 30, "round 1's fits")
    for cid in gone:
        clients[cid].kill()  # SIGKILL while it is fitting round 1
    assert server.wait(60) == 0, server.stderr
    assert "3 rounds" in server.stdout

    with RunStore(tmp_path / "runs.sqlite") as store:
        (run,) = store.list_runs()
        info = store.get_run(run.id)
        records = store.rounds(run.id)
    assert info.status == "finished"
    assert [r.round for r in records] == [1, 2, 3]
    assert [r.num_accepted for r in records] == [4, 4, 4]
    first = {r.client_id: r.reason for r in records[0].rejections}
    assert sorted(first) == list(gone)
    assert all("disconnected" in why for why in first.values()), first
    for record in records[1:]:
        assert {r.client_id: r.reason for r in record.rejections} == dict.fromkeys(
            gone, "client not connected"
        )
    assert sorted(c.client_id for c in records[2].clients) == sorted(set(ids) - set(gone))
    for cid in set(ids) - set(gone):
        assert clients[cid].wait(20) == 0, clients[cid].stderr
    # the survivors' rounds are those of a simulation in which the dead clients fail every fit
    assert info.model_path is not None
    expected = _simulated(load_config(config_file), gone)
    np.testing.assert_allclose(load_model(info.model_path).flat, expected.flat, atol=1e-5)


# -- the server dies mid-round and is started again -------------------------------------------
def test_a_server_killed_mid_round_resumes_from_its_checkpoint_when_restarted(
    group: Procs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"client-{k}" for k in range(3)]
    write_test_pki(tmp_path / "certs", clients=ids)
    config_file = _config(tmp_path, "restart", clients=3, rounds=5, min_replies=3)
    address = f"127.0.0.1:{free_port()}"  # the restarted server listens where the first did
    first = _server(group, config_file, tmp_path, address)
    slow = {"FEDLOOM_TEST_DELAY": "2", "FEDLOOM_TEST_SLOW_ROUND": "3"}  # 2 s in round 3
    clients = [_paced_client(group, address, tmp_path, config_file, c, **slow) for c in ids]
    # every client fitting round 3: round 2 is recorded and checkpointed
    wait_until(lambda: all((tmp_path / f"{c}-r3").exists() for c in ids), 60, "round 3's fits")
    first.kill()  # SIGKILL mid-round
    assert first.popen.returncode == -9
    with RunStore(tmp_path / "runs.sqlite") as store:
        (run,) = store.list_runs()
        assert (run.status, run.rounds) == ("running", 2)  # as a kill -9 leaves it

    second = _server(group, config_file, tmp_path, address)
    assert f"resuming run {run.id} from its checkpoint after round 2" in second.wait_for(
        "fedloom server: resuming"
    )
    assert second.wait(60) == 0, second.stderr
    assert "3 clients connected" in second.stdout and "5 rounds" in second.stdout
    for proc in clients:  # the same processes: they reconnected by themselves
        assert proc.wait(20) == 0, proc.stderr
        assert "connection lost" in proc.stderr and proc.stderr.count("connected to") >= 2

    with RunStore(tmp_path / "runs.sqlite") as store:
        (info,) = [store.get_run(r.id) for r in store.list_runs()]
        records = store.rounds(info.id)
    assert info.id == run.id and info.status == "finished"
    assert [r.round for r in records] == [1, 2, 3, 4, 5]
    assert all(r.num_accepted == 3 and not r.rejections for r in records)
    capsys.readouterr()
    assert main(["show", run.id, "--store", str(tmp_path / "runs.sqlite")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table if line[:5].strip().isdigit()] == list("12345")
    # the resumed run ends with the model an uninterrupted one reaches
    assert info.model_path is not None
    expected = _simulated(load_config(config_file))
    np.testing.assert_allclose(load_model(info.model_path).flat, expected.flat, atol=1e-5)


def test_a_server_stopped_with_ctrl_c_records_the_interruption_and_resumes(
    group: Procs, tmp_path: Path
) -> None:
    write_test_pki(tmp_path / "certs", clients=["client-0"])
    config_file = _config(tmp_path, "ctrl-c", clients=1, rounds=3, min_replies=1)
    address = f"127.0.0.1:{free_port()}"
    first = _server(group, config_file, tmp_path, address)
    slow = {"FEDLOOM_TEST_DELAY": "2", "FEDLOOM_TEST_SLOW_ROUND": "2"}
    client = _paced_client(group, address, tmp_path, config_file, "client-0", **slow)
    wait_until(lambda: (tmp_path / "client-0-r2").exists(), 60, "round 2's fit")
    first.popen.send_signal(signal.SIGINT)
    assert first.wait(30) == 130
    with RunStore(tmp_path / "runs.sqlite") as store:
        (run,) = store.list_runs()
    assert (run.status, run.rounds) == ("interrupted", 1)
    assert f"run {run.id} interrupted; continue it with `fedloom server ..." in first.stderr
    # a stopped server tells its clients it will resume: they wait and reconnect by themselves
    second = _server(group, config_file, tmp_path, address)
    note = second.wait_for("fedloom server: resuming")
    assert f"resuming run {run.id} from its checkpoint after round 1" in note
    assert second.wait(60) == 0, second.stderr
    assert client.wait(20) == 0, client.stderr
    assert "the server was stopped (it will resume)" in client.stderr
    with RunStore(tmp_path / "runs.sqlite") as store:
        assert [r.round for r in store.rounds(run.id)] == [1, 2, 3]
        assert store.get_run(run.id).status == "finished"


def test_a_restarted_server_starts_afresh_when_the_run_has_no_checkpoint(
    group: Procs, tmp_path: Path
) -> None:
    write_test_pki(tmp_path / "certs", clients=["client-0"])
    config_file = _config(tmp_path, "early", clients=1, rounds=1, min_replies=1)
    first = _server(group, config_file, tmp_path, "127.0.0.1:0")
    address = first.wait_for("listening on").rsplit(" ", 1)[-1].strip()
    _paced_client(group, address, tmp_path, config_file, "client-0", FEDLOOM_TEST_STUCK="1")
    wait_until(lambda: (tmp_path / "client-0-r1").exists(), 30, "round 1's fit")
    first.kill()  # in round 1: nothing to resume
    # a resume asked for by id is refused with the reason
    store = str(tmp_path / "runs.sqlite")
    with RunStore(store) as runs:
        (stale,) = runs.list_runs()
    again = group.start("server", "--resume", stale.id, "--store", store, "--certs", str(tmp_path))
    assert again.wait(30) == 2
    assert f"run {stale.id} in {store} has no checkpoint to resume from" in again.stderr
    # the same command as before marks it failed and starts a new run
    second = _server(group, config_file, tmp_path, "127.0.0.1:0", "--wait", "0.5")
    note = second.wait_for("starting a new run")
    assert f"run {stale.id} stopped before its first round was checkpointed" in note
    assert second.wait(30) == 1  # no client came within 0.5 s
    with RunStore(store) as runs:
        info = runs.get_run(stale.id)
        assert (info.status, info.message) == (
            "failed",
            "stopped before its first checkpoint; superseded by a new run",
        )
        assert len(runs.list_runs()) == 1  # the new run is created once clients come


def test_a_server_start_picks_the_last_unfinished_run_of_its_config(tmp_path: Path) -> None:
    """`plan_run`, the decision `fedloom server` makes on start, on a store written by hand."""
    store_path = tmp_path / "runs.sqlite"
    config = RunConfig(name="a")
    other = RunConfig(name="a", federation=Settings(rounds=3))
    with RunStore(store_path) as store:
        old = store.create_run("a", config.to_dict(), 0, str(tmp_path))
        store.record_round(old, RoundRecord(1, {}, 1, 1, 0, 0, 0.1, checkpoint="c1.safetensors"))
        different = store.create_run("a", other.to_dict(), 0, str(tmp_path))  # newer
    plan = plan_run(config, store_path)
    assert (plan.resume, plan.note) == (
        old,
        f"resuming run {old} from its checkpoint after round 1",
    )
    assert plan_run(config, store_path, fresh=True).resume is None
    assert plan_run(other, store_path).note.startswith(f"run {different} stopped before")
    assert plan_run(other, store_path).note == "starting a new run"  # it is marked failed now
    assert plan_run(None, store_path, resume=old[:4]).config == config  # the stored config
    with pytest.raises(ConfigError, match=f"differs from the config stored with run {old}"):
        plan_run(other, store_path, resume=old)
    with RunStore(store_path) as store:
        store.set_status(old, "finished")
    assert plan_run(config, store_path).resume is None
    with pytest.raises(RunStoreError, match=f"run {old} in .* already finished"):
        plan_run(None, store_path, resume=old)
    # one server per store: a second one is told who holds it
    held = lock_store(store_path)
    try:
        with pytest.raises(RunStoreError, match=rf"another fedloom server \(pid {os.getpid()}\)"):
            lock_store(store_path)
    finally:
        held.close()
    lock_store(store_path).close()


# -- who may join -----------------------------------------------------------------------------
def test_the_server_command_refuses_clients_without_a_certificate_of_its_ca(
    group: Procs, tmp_path: Path
) -> None:
    pki = write_test_pki(tmp_path / "certs", clients=["client-0"])
    config_file = _config(tmp_path, "tls", clients=1, rounds=1, min_replies=1)
    server = _server(group, config_file, tmp_path, "127.0.0.1:0", "--wait", "120")
    address = server.wait_for("listening on").rsplit(" ", 1)[-1].strip()
    # no client certificate at all: the TLS handshake fails
    with pytest.raises(ParticipantError, match="did the server refuse this client's certificate"):
        run_participant(address, "client-0", Idle(), root_cert=pki.ca.read_bytes(), retry_for=0)
    # `fedloom client` with a certificate another CA signed (and this server's CA): exit 1
    other = write_test_pki(tmp_path / "other", clients=["client-0"])
    mixed = tmp_path / "mixed"
    (mixed / "clients").mkdir(parents=True)
    (mixed / "ca.pem").write_bytes(pki.ca.read_bytes())
    for path in other.client_files("client-0"):
        (mixed / "clients" / path.name).write_bytes(path.read_bytes())
    client = group.start(
        "client", "--server", address, "--certs", str(mixed), "--client-id", "client-0",
        "--trainer", "deploy_helpers:idle", "--retry-for", "0",
    )  # fmt: skip
    assert client.wait(30) == 1
    assert "fedloom: error: cannot reach the server" in client.stderr
    assert "did the server refuse this client's certificate?" in client.stderr
    # a client whose certificate is missing stops before connecting, naming the file
    missing = group.start(
        "client", "--server", address, "--certs", str(tmp_path / "certs"), "--client-id",
        "client-9", "--trainer", "deploy_helpers:idle",
    )  # fmt: skip
    assert missing.wait(30) == 2
    assert "client-9.pem" in missing.stderr and "cannot read the certificate" in missing.stderr
    assert server.popen.poll() is None  # the server goes on
    good = group.start(
        "client", "--server", address, "--certs", str(tmp_path / "certs"), "--client-id",
        "client-0", "--trainer", "deploy_helpers:idle",
    )  # fmt: skip
    good.wait_for("connected to", stream="err")


def test_the_server_command_applies_its_allow_and_revocation_files_live(
    group: Procs, tmp_path: Path
) -> None:
    ids = ["ok", "stranger", "banned", "late"]
    write_test_pki(tmp_path / "certs", clients=ids)
    allow, revoked = tmp_path / "allow.txt", tmp_path / "revoked.txt"
    allow.write_text("ok\nbanned\nlate\n")
    revoked.write_text("banned  # key leaked\n")
    config_file = _config(tmp_path, "enrol", clients=4, rounds=1, min_replies=1)
    server = _server(
        group, config_file, tmp_path, "127.0.0.1:0", "--wait", "120",
        "--allow", str(allow), "--revoked", str(revoked),
    )  # fmt: skip
    address = server.wait_for("listening on").rsplit(" ", 1)[-1].strip()

    def client(cid: str) -> Proc:
        return group.start(
            "client", "--server", address, "--certs", str(tmp_path / "certs"),
            "--client-id", cid, "--trainer", "deploy_helpers:idle", "--retry-for", "0",
        )  # fmt: skip

    stranger, banned, late, ok = client("stranger"), client("banned"), client("late"), client("ok")
    assert stranger.wait(30) == 1 and banned.wait(30) == 1
    assert (
        "fedloom: error: the server refused us: client 'stranger' is not enrolled "
        "(not on this server's allow-list)" in stranger.stderr
    )
    assert "the server refused us: client 'banned' has been revoked" in banned.stderr
    server.wait_for("refused client 'stranger'", stream="err")
    server.wait_for("refused client 'banned'", stream="err")
    late.wait_for("connected to", stream="err")
    ok.wait_for("connected to", stream="err")
    # revoked while connected: the server re-reads the file within a second and drops it
    revoked.write_text("banned  # key leaked\nlate\n")
    assert late.wait(15) == 1
    assert "the server refused us: client 'late' has been revoked" in late.stderr
    server.wait_for("enrolment files re-read")
    server.wait_for("dropping client 'late'", stream="err")
    assert ok.popen.poll() is None and server.popen.poll() is None
