"""Deployment over gRPC with TLS: real client processes, real certificates, 127.0.0.1 only."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_toys import WIDE, Wide
from toy import federation_of, initial

import fedloom
from fedloom.algorithms import FedAvg, PlainLocal
from fedloom.certs import PkiFiles, write_test_pki
from fedloom.config import parse_config
from fedloom.core.types import FitConfig, Reply, Task, TaskKind
from fedloom.experiment import build_strategy, build_trainers, load_clients, standardize
from fedloom.proto import fedloom_pb2 as pb
from fedloom.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.frames import MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from fedloom.runtime.participant import ParticipantError, run_participant
from fedloom.runtime.remote import GrpcTransport

SRC = Path(fedloom.__file__).resolve().parents[1]
#: Every client id these tests use: each has its own certificate (its common name).
CLIENTS = ("c00", "c01", "c02", "wide", "raw", "x", "slow", "client-0", "client-1", "client-2")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return write_test_pki(tmp_path_factory.mktemp("pki"), clients=CLIENTS)


@pytest.fixture
def transport(pki: PkiFiles) -> Iterator[GrpcTransport]:
    with GrpcTransport(
        "127.0.0.1:0",
        server_cert=pki.server_cert.read_bytes(),
        server_key=pki.server_key.read_bytes(),
        client_ca=pki.ca.read_bytes(),
        timeout=30.0,
    ) as t:
        yield t


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    """Start `fedloom client ...` processes; every one is killed at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedloom", "client", *args],
            env={**environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _certs(pki: PkiFiles) -> str:
    return str(pki.ca.parent)


def _args(transport: GrpcTransport, pki: PkiFiles, client_id: str, trainer: str) -> list[str]:
    """`fedloom client` arguments for a `grpc_toys` trainer."""
    return ["--server", transport.address, "--certs", _certs(pki), "--client-id", client_id,
            "--trainer", f"grpc_toys:{trainer}"]  # fmt: skip


def _fit(client_id: str, params: object = None) -> Task:
    return Task(client_id, TaskKind.FIT, params or initial(), FitConfig(round=1))  # type: ignore[arg-type]


# -- (a) three client processes train a real model over TLS -----------------------------------
def test_three_client_processes_train_digits_to_the_simulations_model(
    transport: GrpcTransport, pki: PkiFiles, spawn, tmp_path: Path
) -> None:
    raw = {
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 3},
        "federation": {
            "rounds": 5,
            "fraction_fit": 1.0,
            "min_fit_clients": 3,
            "learning_rate": 0.1,
            "batch_size": 16,
            "fraction_evaluate": 1.0,
        },
    }
    config_file = tmp_path / "digits.toml"
    config_file.write_text(
        '[data]\ndataset = "digits"\npartition = "iid"\nnum_clients = 3\n'
        "[federation]\nrounds = 5\nfraction_fit = 1.0\nmin_fit_clients = 3\n"
        "learning_rate = 0.1\nbatch_size = 16\nfraction_evaluate = 1.0\n"
    )
    clients = [
        spawn("--server", transport.address, "--certs", _certs(pki), "--config", str(config_file),
              "--partition", str(k))
        for k in range(3)
    ]  # fmt: skip
    config = parse_config(raw)
    trainers, init, evaluate = build_trainers(
        config.model, standardize(load_clients(config.data, 0))
    )
    ids = transport.wait_for_clients(3, timeout=30)
    assert ids == sorted(trainers)
    strategy = build_strategy(config.strategy, 3)
    result = Federation(strategy, transport, ids, config.federation, evaluate_fn=evaluate).run(init)
    transport.close()
    assert result.metric("accuracy")[-1] >= 0.93
    assert all(r.num_accepted == 3 and not r.rejections for r in result.history)
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in result.history)
    assert "federated_accuracy" in result.history[-1].metrics
    # the same clients simulated in one process reach the same model (up to summation order)
    simulated = Federation.simulation(strategy, trainers, config.federation).run(init)
    np.testing.assert_allclose(result.state.params.flat, simulated.state.params.flat, atol=1e-5)
    for proc in clients:  # each said goodbye and exited cleanly
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "done, 10 task(s) run" in out  # 5 fits + 5 evaluations


# -- (b) payloads above gRPC's 4 MiB message limit travel in chunks -----------------------------
def test_a_payload_larger_than_4_mib_round_trips(
    transport: GrpcTransport, pki: PkiFiles, spawn
) -> None:
    spawn(*_args(transport, pki, "wide", "wide"))
    assert transport.wait_for_clients(1, timeout=30) == ["wide"]
    params = Wide().initial_params()
    (reply,) = transport.dispatch([_fit("wide", params)], PlainLocal())
    assert reply.failure is None and reply.update is not None
    assert reply.bytes_down > 4 * 2**20 and reply.bytes_up > 4 * 2**20
    assert reply.update.delta.flat.shape == (WIDE,)
    np.testing.assert_array_equal(reply.update.delta.flat, params.flat * -0.5)
    assert reply.update.num_examples == 7


# -- (c) TLS: a client that does not trust the server's CA cannot connect -----------------------
def test_a_client_with_another_ca_fails_clearly_and_the_server_is_unaffected(
    transport: GrpcTransport, pki: PkiFiles, spawn, tmp_path: Path
) -> None:
    other = write_test_pki(tmp_path / "other", clients=["c00"])
    bad = spawn(*_args(transport, other, "c00", "toy"), "--retry-for", "0")
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in err and "TLS handshake failed" in err
    assert transport.connected() == []
    good = spawn(*_args(transport, pki, "c00", "toy"))
    assert transport.wait_for_clients(1, timeout=30) == ["c00"]
    (reply,) = transport.dispatch([_fit("c00")], PlainLocal())
    assert reply.update is not None
    transport.close()
    assert good.wait(timeout=20) == 0


def test_a_server_refuses_a_client_certificate_from_another_ca(
    transport: GrpcTransport, pki: PkiFiles, tmp_path: Path
) -> None:
    other = write_test_pki(tmp_path / "other", clients=["c00"])
    cert, key = other.client_files("c00")
    with pytest.raises(ParticipantError, match="refuse this client's certificate"):
        run_participant(
            transport.address,
            "c00",
            federation_of(1)["c00"],
            root_cert=pki.ca.read_bytes(),
            cert_chain=cert.read_bytes(),
            private_key=key.read_bytes(),
            retry_for=0,
        )
    assert transport.connected() == []


# -- (d) a client that dies mid-round is a failure; the round goes on ---------------------------
def test_a_client_killed_mid_round_is_a_failure_and_the_round_goes_on(
    transport: GrpcTransport, pki: PkiFiles, spawn, tmp_path: Path
) -> None:
    marker = tmp_path / "fitting"
    for cid in ("c00", "c01"):
        spawn(*_args(transport, pki, cid, "toy"))
    stuck = spawn(*_args(transport, pki, "c02", "stuck"), env={"FEDLOOM_TEST_MARKER": str(marker)})
    assert transport.wait_for_clients(3, timeout=30) == ["c00", "c01", "c02"]

    def kill_when_fitting() -> None:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck.kill()

    killer = threading.Thread(target=kill_when_fitting)
    killer.start()
    settings = Settings(rounds=1, fraction_fit=1.0, min_fit_clients=3, min_replies=2)
    start = time.monotonic()
    result = Federation(FedAvg(), transport, transport.connected(), settings).run(initial())
    killer.join()
    assert time.monotonic() - start < 20  # noticed the disconnect, not the 30 s timeout
    (record,) = result.history
    assert record.num_accepted == 2
    ((who, why),) = [(r.client_id, r.reason) for r in record.rejections]
    assert who == "c02" and "disconnected" in why
    assert transport.connected() == ["c00", "c01"]


def test_a_reply_that_does_not_come_in_time_is_a_failure(pki: PkiFiles) -> None:
    release = threading.Event()

    class Slow:
        def __init__(self) -> None:
            self.toy = federation_of(1)["c00"]

        def initial_params(self):  # type: ignore[no-untyped-def]
            return initial()

        def fit(self, params, config):  # type: ignore[no-untyped-def]
            release.wait(20)
            return self.toy.fit(params, config)

        def evaluate(self, params, config):  # type: ignore[no-untyped-def]
            return self.toy.evaluate(params, config)

    with GrpcTransport(
        server_cert=pki.server_cert.read_bytes(),
        server_key=pki.server_key.read_bytes(),
        timeout=0.5,
    ) as server:
        stop = threading.Event()
        client = threading.Thread(
            target=run_participant,
            args=(server.address, "slow", Slow()),
            kwargs={"root_cert": pki.ca.read_bytes(), "stop": stop, "log": lambda _: None},
        )
        client.start()
        try:
            server.wait_for_clients(1, timeout=10)
            (reply,) = server.dispatch([_fit("slow")], PlainLocal())
            assert reply.failure is not None and "no reply within 0.5 s" in reply.failure.reason
            replies = list(server.dispatch([_fit("absent")], PlainLocal()))
            assert replies[0].failure is not None
            assert replies[0].failure.reason == "client not connected"
        finally:
            release.set()
            stop.set()
            client.join(10)
        assert not client.is_alive()


# -- (e) malformed and oversized replies are rejected with a reason ----------------------------
class RawClient:
    """Speaks the protocol by hand, to send what a real participant never would."""

    def __init__(self, address: str, pki: PkiFiles, client_id: str) -> None:
        cert, key = pki.client_files(client_id)
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        self.channel = grpc.secure_channel(
            address, credentials, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.out: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
        hello = pb.Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION)
        self.out.put(pb.ClientMessage(hello=hello))
        self.responses = pb_grpc.FederationStub(self.channel).Session(iter(self.out.get, None))
        assert next(self.responses).WhichOneof("body") == "welcome"

    def task_chunks(self) -> None:
        """Read the model's and the task's chunks, up to the task's last."""
        while True:
            message = next(self.responses)
            if message.WhichOneof("body") == "task" and message.task.last:
                return

    def reply(self, data: bytes, total: int | None = None) -> None:
        total = len(data) if total is None else total
        chunk = pb.Chunk(frame_id=1, total_size=total, data=data, last=True)
        self.out.put(pb.ClientMessage(reply=chunk))

    def close(self) -> None:
        self.out.put(None)
        self.responses.cancel()
        self.channel.close()


def _dispatch_with(
    transport: GrpcTransport, raw: RawClient, data: bytes, total: int | None = None
) -> Reply:
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: list(transport.dispatch([_fit("raw")], PlainLocal())))
        raw.task_chunks()
        raw.reply(data, total)
        (reply,) = future.result(timeout=20)
    return reply


def test_a_garbage_reply_is_rejected_with_a_reason(transport: GrpcTransport, pki: PkiFiles) -> None:
    raw = RawClient(transport.address, pki, "raw")
    try:
        transport.wait_for_clients(1, timeout=10)
        reply = _dispatch_with(transport, raw, b"\x05\x00\x00\x00garbage")
        assert reply.failure is not None
        assert reply.failure.reason.startswith("rejected reply: malformed reply frame")
        notice = next(raw.responses)
        assert "reply rejected" in notice.notice.text
        assert transport.connected() == ["raw"]  # a bad frame does not end the session
    finally:
        raw.close()


def test_a_reply_frame_over_the_cap_ends_the_session_with_a_reason(
    transport: GrpcTransport, pki: PkiFiles
) -> None:
    raw = RawClient(transport.address, pki, "raw")
    try:
        transport.wait_for_clients(1, timeout=10)
        reply = _dispatch_with(transport, raw, b"x" * 10, total=3 << 30)
        assert reply.failure is not None
        assert (
            "protocol violation: frame of 3221225472 bytes exceeds the cap" in reply.failure.reason
        )
        goodbye = next(raw.responses).goodbye
        assert goodbye.fatal and "exceeds the cap" in goodbye.reason
        assert transport.connected() == []
    finally:
        raw.close()
    _still_serves(transport, pki)


def test_a_message_over_grpcs_limit_is_refused_and_the_server_goes_on(
    transport: GrpcTransport, pki: PkiFiles
) -> None:
    raw = RawClient(transport.address, pki, "raw")
    try:
        transport.wait_for_clients(1, timeout=10)
        reply = _dispatch_with(transport, raw, b"x" * (MAX_MESSAGE_BYTES + 1))  # one message
        assert reply.failure is not None and "disconnected" in reply.failure.reason
        with pytest.raises(grpc.RpcError) as info:
            next(raw.responses)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "larger than max" in info.value.details()  # type: ignore[attr-defined]
    finally:
        raw.close()
    _still_serves(transport, pki)


def _still_serves(transport: GrpcTransport, pki: PkiFiles) -> None:
    again = RawClient(transport.address, pki, "raw")
    try:
        assert transport.wait_for_clients(1, timeout=10) == ["raw"]
    finally:
        again.close()


def test_a_wrong_protocol_version_is_refused(transport: GrpcTransport, pki: PkiFiles) -> None:
    cert, key = pki.client_files("x")
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    with grpc.secure_channel(transport.address, credentials) as channel:
        hello = pb.ClientMessage(hello=pb.Hello(client_id="x", protocol_version=99))
        (message,) = list(pb_grpc.FederationStub(channel).Session(iter([hello])))
    assert message.goodbye.fatal and "protocol version 99" in message.goodbye.reason
    assert transport.connected() == []


def test_a_participant_reconnects_when_the_server_comes_back(pki: PkiFiles) -> None:
    def server(address: str) -> GrpcTransport:
        return GrpcTransport(
            address,
            server_cert=pki.server_cert.read_bytes(),
            server_key=pki.server_key.read_bytes(),
        )

    first = server("127.0.0.1:0")
    stop = threading.Event()
    client = threading.Thread(
        target=run_participant,
        args=(first.address, "c00", federation_of(1)["c00"]),
        kwargs={
            "root_cert": pki.ca.read_bytes(),
            "stop": stop,
            "backoff": (0.1, 0.2),
            "retry_for": 20.0,
            "log": lambda _: None,
        },
    )
    client.start()
    second = None
    try:
        assert first.wait_for_clients(1, timeout=10) == ["c00"]
        first._server.stop(None).wait()  # the server goes away without a goodbye
        second = server(first.address)
        assert second.wait_for_clients(1, timeout=10) == ["c00"]
        (reply,) = second.dispatch([_fit("c00")], PlainLocal())
        assert reply.update is not None
    finally:
        first.close()
        if second is not None:
            second.close()  # goodbye: the participant returns
        client.join(10)
        stop.set()
    assert not client.is_alive()
