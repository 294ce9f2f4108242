"""Who may join and whose updates count: enrolment, signed replies, heartbeats, late replies.

Real TLS on 127.0.0.1 with per-client certificates; participants run in threads, and a raw
client speaks the protocol by hand to send what a real participant never would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from participants import participants as participants_in_threads
from toy import Toy, federation_of, initial

from fedloom.algorithms import FedAvg, PlainLocal
from fedloom.certs import PkiFiles, write_test_pki
from fedloom.core.params import Params
from fedloom.core.types import FitConfig, Reply, Task, TaskKind, Update
from fedloom.proto import fedloom_pb2 as pb
from fedloom.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.runtime.enrolment import (
    Enrolment,
    EnrolmentError,
    fingerprint,
    frame_digest,
    load_private_key,
    reply_message,
)
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.frames import PROTOCOL_VERSION, decode_task, encode_blob, encode_reply
from fedloom.runtime.participant import ParticipantError, run_participant
from fedloom.runtime.remote import GrpcTransport
from fedloom.runtime.streams import Assembler

IDS = ("c00", "c01", "c02", "x", "raw", "slow")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return write_test_pki(tmp_path_factory.mktemp("pki"), clients=IDS)


def _server(
    pki: PkiFiles, log: list[str] | None = None, address: str = "127.0.0.1:0", **options: object
) -> GrpcTransport:
    return GrpcTransport(
        address,
        server_cert=pki.server_cert.read_bytes(),
        server_key=pki.server_key.read_bytes(),
        client_ca=pki.ca.read_bytes(),
        log=(log.append if log is not None else lambda _: None),
        **options,  # type: ignore[arg-type]
    )


def _cert(pki: PkiFiles, cid: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.client_files(cid)[0].read_bytes())


class Participant:
    """`run_participant` in a thread as `client_id` with `as_cert`'s certificate; `.error`
    holds the `ParticipantError` it ended with, if any."""

    def __init__(
        self, address: str, pki: PkiFiles, client_id: str, trainer: object, as_cert: str = ""
    ) -> None:
        cert, key = pki.client_files(as_cert or client_id)
        self.stop = threading.Event()
        self.error: ParticipantError | None = None

        def run() -> None:
            try:
                run_participant(
                    address,
                    client_id,
                    trainer,  # type: ignore[arg-type]
                    root_cert=pki.ca.read_bytes(),
                    cert_chain=cert.read_bytes(),
                    private_key=key.read_bytes(),
                    retry_for=0,
                    stop=self.stop,
                    log=lambda _: None,
                )
            except ParticipantError as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def participants() -> Iterator[list[Participant]]:
    started: list[Participant] = []
    yield started
    for p in started:
        p.join()


def _fit(client_id: str, params: Params | None = None, number: int = 1) -> Task:
    return Task(client_id, TaskKind.FIT, params or initial(), FitConfig(round=number))


# -- identity and enrolment ---------------------------------------------------------------------
def test_a_client_claiming_another_id_than_its_certificate_is_refused_on_both_sides(
    pki: PkiFiles, participants: list[Participant]
) -> None:
    log: list[str] = []
    with _server(pki, log) as server:
        p = Participant(server.address, pki, "c01", federation_of(2)["c01"], as_cert="c00")
        participants.append(p)
        p.thread.join(10)
        assert isinstance(p.error, ParticipantError)
        assert "the server refused us: the certificate was issued to 'c00'" in str(p.error)
        assert "says it is 'c01'" in str(p.error)
        assert server.connected() == []
        assert any("refused client 'c01'" in line and "issued to 'c00'" in line for line in log)


def test_the_allow_list_and_the_revocation_list_refuse_clearly(
    pki: PkiFiles, participants: list[Participant], tmp_path: Path
) -> None:
    allow, revoked = tmp_path / "allow.txt", tmp_path / "revoked.txt"
    allow.write_text("# enrolled\nc00\nc01\nc02\n")
    revoked.write_text(f"c01  # lost laptop\n{fingerprint(_cert(pki, 'c02'))}\n")
    log: list[str] = []
    toys = federation_of(3)
    with _server(pki, log, enrolment=Enrolment.from_files(allow, revoked)) as server:
        for cid, trainer in [*toys.items(), ("x", toys["c00"])]:
            participants.append(Participant(server.address, pki, cid, trainer))
        for p in participants[1:]:
            p.thread.join(10)
        assert server.wait_for_clients(1, timeout=10) == ["c00"]
        assert [str(p.error) for p in participants[1:]] == [
            f"the server refused us: {why}"
            for why in (
                "client 'c01' has been revoked",
                "the certificate of client 'c02' has been revoked",
                "client 'x' is not enrolled (not on this server's allow-list)",
            )
        ]
        assert sum("refused client" in line for line in log) == 3
        (reply,) = server.dispatch([_fit("c00")], PlainLocal())
        assert reply.update is not None


def test_revoking_a_connected_client_drops_it_at_once(
    pki: PkiFiles, participants: list[Participant]
) -> None:
    with _server(pki) as server:
        for cid, trainer in federation_of(2).items():
            participants.append(Participant(server.address, pki, cid, trainer))
        assert server.wait_for_clients(2, timeout=10) == ["c00", "c01"]
        server.set_enrolment(Enrolment(revoked_ids=frozenset({"c01"})))
        participants[1].thread.join(10)
        assert "the server refused us: client 'c01' has been revoked" in str(participants[1].error)
        assert server.connected() == ["c00"]


def test_a_malformed_enrolment_file_is_named() -> None:
    with pytest.raises(EnrolmentError, match=r"no-such-file\.txt: cannot read the list"):
        Enrolment.from_files(Path("no-such-file.txt"))


def test_an_enrolment_policy_without_client_certificates_is_a_configuration_error(
    pki: PkiFiles,
) -> None:
    with pytest.raises(ValueError, match="enrolment policy needs client certificates"):
        GrpcTransport(
            server_cert=pki.server_cert.read_bytes(),
            server_key=pki.server_key.read_bytes(),
            enrolment=Enrolment(allowed=frozenset({"c00"})),
        )


# -- signed replies -----------------------------------------------------------------------------
class RawClient:
    """Speaks the protocol by hand: receives tasks, sends replies signed with any client's key."""

    def __init__(self, address: str, pki: PkiFiles, client_id: str, heartbeat: bool = False):
        cert, key = pki.client_files(client_id)
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        self.pki, self.client_id = pki, client_id
        self.channel = grpc.secure_channel(address, credentials)
        self.out: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
        hello = pb.Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION)
        self.out.put(pb.ClientMessage(hello=hello))
        self.responses = pb_grpc.FederationStub(self.channel).Session(iter(self.out.get, None))
        self.welcome = next(self.responses).welcome
        self.blobs: dict[int, bytes] = {}

    def next_task(self) -> tuple[int, bytes, Task]:
        """Read blobs and one task: (task id, nonce, task)."""
        tasks, blobs = Assembler(), Assembler()
        while True:
            message = next(self.responses)
            kind = message.WhichOneof("body")
            if kind == "blob" and (frame := blobs.add(message.blob)) is not None:
                self.blobs[message.blob.frame_id] = frame
            elif kind == "task" and (frame := tasks.add(message.task)) is not None:
                task_id, nonce, task, _ = decode_task(frame, self.blobs)
                return task_id, nonce, task

    def reply_chunks(
        self, task_id: int, nonce: bytes, update: Update, key_of: str
    ) -> list[pb.Chunk]:
        """The chunks of a reply to `task_id`, signed with `key_of`'s key for `nonce`."""
        frame = encode_reply(task_id, Reply(self.client_id, update=update))
        signer = load_private_key(self.pki.client_files(key_of)[1].read_bytes())
        sig = signer.sign(reply_message(nonce, frame_digest(frame)))
        return [
            pb.Chunk(frame_id=task_id, total_size=len(frame), data=frame, last=True, signature=sig)
        ]

    def send(self, parts: list[pb.Chunk]) -> None:
        for chunk in parts:
            self.out.put(pb.ClientMessage(reply=chunk))

    def close(self) -> None:
        self.out.put(None)
        self.responses.cancel()
        self.channel.close()


def _update(params: Params, scale: float = 0.5) -> Update:
    return Update(params * scale, 10, 1, {"loss": 1.0})


def _dispatch(server: GrpcTransport, task: Task) -> Iterator[Reply]:
    """`dispatch` in a thread; returns the future's result iterator when done."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(lambda: list(server.dispatch([task], PlainLocal())))
    pool.shutdown(wait=False)
    return future  # type: ignore[return-value]


def test_an_update_signed_with_another_clients_key_is_rejected(pki: PkiFiles) -> None:
    log: list[str] = []
    with _server(pki, log, timeout=20.0) as server:
        raw = RawClient(server.address, pki, "raw")
        try:
            assert raw.welcome.sign_replies is True
            server.wait_for_clients(1, timeout=10)
            for signer, accepted in (("c00", False), ("raw", True)):
                future = _dispatch(server, _fit("raw"))
                task_id, nonce, task = raw.next_task()
                raw.send(raw.reply_chunks(task_id, nonce, _update(task.params), key_of=signer))
                (reply,) = future.result(timeout=20)  # type: ignore[attr-defined]
                assert (reply.update is not None) is accepted, reply.failure
            assert server.connected() == ["raw"]  # the session goes on
        finally:
            raw.close()
    assert any("signature does not verify with client 'raw'" in line for line in log)


def test_a_server_that_does_not_verify_signatures_does_not_ask_for_them(pki: PkiFiles) -> None:
    with _server(pki, timeout=20.0, signed_replies=False) as server:
        raw = RawClient(server.address, pki, "raw")
        try:
            assert raw.welcome.sign_replies is False
            server.wait_for_clients(1, timeout=10)
            future = _dispatch(server, _fit("raw"))
            task_id, _, task = raw.next_task()
            unsigned = raw.reply_chunks(task_id, b"", _update(task.params), key_of="raw")
            unsigned[-1].signature = b""
            raw.send(unsigned)
            (reply,) = future.result(timeout=20)  # type: ignore[attr-defined]
            assert reply.update is not None  # mutual TLS alone vouches for it
        finally:
            raw.close()


def test_a_replayed_update_from_an_old_round_is_rejected(pki: PkiFiles) -> None:
    with _server(pki, timeout=20.0) as server:
        raw = RawClient(server.address, pki, "raw")
        try:
            server.wait_for_clients(1, timeout=10)
            future = _dispatch(server, _fit("raw", number=1))
            old_id, old_nonce, task = raw.next_task()
            old = raw.reply_chunks(old_id, old_nonce, _update(task.params), key_of="raw")
            raw.send(old)
            (first,) = future.result(timeout=20)  # type: ignore[attr-defined]
            assert first.update is not None

            future = _dispatch(server, _fit("raw", initial() * 3.0, number=2))
            task_id, _, task = raw.next_task()
            raw.send(old)  # the very same bytes: its task was answered already
            # the old update relabelled for the new task, with the old (now wrong) signature
            relabelled = raw.reply_chunks(task_id, old_nonce, _update(initial()), key_of="raw")
            raw.send(relabelled)
            (second,) = future.result(timeout=20)  # type: ignore[attr-defined]
            assert second.update is None and second.failure is not None
            assert "signature does not verify" in second.failure.reason
            (late,) = server.late_replies()
            assert late.client_id == "raw" and late.failure is not None
            assert f"second reply to task {old_id} of round 1 (a replay?)" in late.failure.reason
        finally:
            raw.close()


# -- heartbeats, deadlines, late replies, the model once per round -------------------------------
class Slow(Toy):
    """A toy client whose fit takes `seconds` (in round 1 only, if `first_only`)."""

    def __init__(self, seconds: float, first_only: bool = False) -> None:
        base = federation_of(1)["c00"]
        super().__init__(base.target, base.num_train_examples)
        self.seconds, self.first_only = seconds, first_only

    def fit(self, params: Params, config: FitConfig) -> Update:
        if config.round == 1 or not self.first_only:
            time.sleep(self.seconds)
        return super().fit(params, config)


def test_a_silent_client_is_dropped_while_a_training_one_keeps_beating(
    pki: PkiFiles, participants: list[Participant]
) -> None:
    log: list[str] = []
    with _server(pki, log, heartbeat=0.2, timeout=30.0) as server:
        participants.append(Participant(server.address, pki, "slow", Slow(1.5)))
        raw = RawClient(server.address, pki, "raw")  # connected, but never says a word
        try:
            assert server.wait_for_clients(2, timeout=10) == ["raw", "slow"]
            start = time.monotonic()
            replies = {
                r.client_id: r for r in server.dispatch([_fit("raw"), _fit("slow")], PlainLocal())
            }
            assert time.monotonic() - start < 10  # not the 30 s deadline
            assert replies["slow"].update is not None  # 1.5 s of training = 7 heartbeat periods
            why = replies["raw"].failure.reason if replies["raw"].failure else ""
            assert (
                why.startswith("client went silent (no heartbeat for 0.")
                and "before replying" in why
            )
            assert server.connected() == ["slow"]
        finally:
            raw.close()
    assert any("dropping client 'raw': no heartbeat" in line for line in log)


def test_a_late_reply_is_discarded_and_never_mixed_into_the_next_round(
    pki: PkiFiles, participants: list[Participant]
) -> None:
    with _server(pki, timeout=0.5) as server:
        participants.append(Participant(server.address, pki, "slow", Slow(1.5, first_only=True)))
        server.wait_for_clients(1, timeout=10)
        (first,) = server.dispatch([_fit("slow", number=1)], PlainLocal())
        assert first.failure is not None
        assert first.failure.reason == "straggler: no reply within 0.5 s"
        server.timeout = 20.0  # round 2 is sent while the round-1 reply is still being made
        params = initial() * 2.0
        (second,) = server.dispatch([_fit("slow", params, number=2)], PlainLocal())
        # by now the round-1 reply has come: it was discarded, not taken as this round's
        (late,) = server.late_replies()
        assert late.failure is not None and "late reply to task" in late.failure.reason
        assert "of round 1 (it missed the 0.5 s deadline)" in late.failure.reason
        assert second.update is not None
        expected = Slow(0).fit(params, FitConfig(round=2))
        np.testing.assert_allclose(second.update.delta.flat, expected.delta.flat, rtol=1e-6)


def test_a_session_receives_each_model_once_per_dispatch(
    pki: PkiFiles, participants: list[Participant]
) -> None:
    with _server(pki) as server:
        participants.append(Participant(server.address, pki, "c00", federation_of(1)["c00"]))
        server.wait_for_clients(1, timeout=10)
        params = initial()
        first, second = server.dispatch([_fit("c00", params), _fit("c00", params)], PlainLocal())
        assert first.update is not None and second.update is not None
        assert first.bytes_down - second.bytes_down == len(encode_blob(params))


def test_a_second_server_cannot_take_a_port_in_use(pki: PkiFiles) -> None:
    with _server(pki) as first, pytest.raises(OSError, match=f"cannot listen on {first.address}"):
        _server(pki, address=first.address)


def test_a_wrong_shape_update_is_rejected_and_the_round_goes_on(pki: PkiFiles) -> None:
    """A properly signed reply whose update has the wrong shape is a rejection naming the
    tensor; the round aggregates the other client's update alone."""
    toy = federation_of(1)["c00"]
    settings = Settings(rounds=1, fraction_fit=1.0, min_fit_clients=2, min_replies=1)
    with (
        _server(pki, timeout=20.0) as server,
        participants_in_threads(server.address, {"c00": toy}, pki),
    ):
        raw = RawClient(server.address, pki, "raw")
        try:
            server.wait_for_clients(2, timeout=10)
            pool = ThreadPoolExecutor(1)
            run = pool.submit(Federation(FedAvg(), server, ["c00", "raw"], settings).run, initial())
            task_id, nonce, _ = raw.next_task()
            wrong = Params.from_arrays(
                {"w": np.ones((3, 2), np.float32), "b": np.ones(1, np.float32)}
            )
            raw.send(raw.reply_chunks(task_id, nonce, _update(wrong), key_of="raw"))
            result = run.result(timeout=30)
            pool.shutdown()
        finally:
            raw.close()
    (record,) = result.history
    assert record.num_accepted == 1 and [c.client_id for c in record.clients] == ["c00"]
    ((who, why),) = [(r.client_id, r.reason) for r in record.rejections]
    assert who == "raw" and why.startswith("delta: ") and "'w'" in why and "(3, 2)" in why
    # the same round simulated, with a second client that fails, ends with the same model
    failing = {"c00": federation_of(1)["c00"], "raw": Toy(toy.target, 10, mode="raise")}
    simulated = Federation.simulation(FedAvg(), failing, settings).run(initial())
    np.testing.assert_allclose(result.state.params.flat, simulated.state.params.flat, rtol=1e-6)
