"""`GrpcTransport`: the server side of real deployment, over gRPC with TLS.

Clients connect OUT to the server (`fedloom.runtime.participant`) and keep one bidirectional
stream open (`fedloom.proto`: `Federation.Session`); the server never dials a client. Each
connected client id has one session; a new session with the same id replaces the older one.
With mutual TLS a client's id is its certificate's common name, its `Enrolment` decides whether
it may join, and each of its replies must carry a valid signature over the task's nonce
(`fedloom.runtime.enrolment`). A session silent for 3 heartbeat periods is dropped.

`dispatch` sends every task to its client's session and yields replies IN THE ORDER THEY
ARRIVE (not task order): first the immediate failures (client not connected), then each reply
as its last chunk lands. A client that is not connected or disconnects, a reply that does not
arrive within `timeout` seconds of the dispatch, and a malformed or oversized reply each become
a `Reply` with a `Failure` (a value, never an exception). A client that breaks the chunk framing
or sends a frame over `max_frame_bytes` loses its session (its pending tasks fail) and is told
why; the server and the other clients go on. Replies that come after their dispatch stopped
waiting (late, or to a task this server never sent) are discarded and kept for
`late_replies`.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc
from cryptography import x509

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.params import Params
from fedloom.core.types import Failure, Reply, Task
from fedloom.proto import fedloom_pb2 as pb
from fedloom.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.runtime.enrolment import Enrolment, reply_message, verify
from fedloom.runtime.frames import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Assembler,
    FrameError,
    chunks,
    decode_reply,
    encode_blob,
    encode_task,
    local_spec,
)

#: What a dispatch waits on: (task id, reply).
_Results = queue.SimpleQueue[tuple[int, Reply]]
_MAX_ID = 256
#: Task ids whose dispatch gave up, remembered to tell a late reply from an unknown one.
_EXPIRED_KEPT = 4096


@dataclass
class _Pending:
    results: _Results
    bytes_down: int
    nonce: bytes
    round: int


@dataclass(eq=False)
class _Session:
    client_id: str
    peer: str
    #: The client's certificate (mutual TLS), which verifies its replies' signatures.
    cert: x509.Certificate | None = None
    outbox: queue.SimpleQueue[list[pb.ServerMessage] | None] = field(
        default_factory=queue.SimpleQueue
    )
    #: Tasks sent and not yet answered, in send order (the client answers in that order).
    pending: dict[int, _Pending] = field(default_factory=dict)
    dropped: bool = False
    last_seen: float = field(default_factory=time.monotonic)

    def send(self, *messages: pb.ServerMessage) -> None:
        self.outbox.put(list(messages))


def _failure(client_id: str, why: str, bytes_down: int = 0) -> Reply:
    return Reply(client_id, failure=Failure(client_id, why), bytes_down=bytes_down)


class GrpcTransport:
    """A TLS gRPC server on `address` ("host:port"; port 0 picks a free one, see `.address`).

    `server_cert`/`server_key` are PEM bytes; with `client_ca` (PEM) every client must present
    a certificate signed by it (mutual TLS), named for its client id, admitted by `enrolment`
    (default: every certified client), and sign its replies. `timeout` bounds each dispatch, in
    seconds (the round's deadline: stragglers are cut off). Clients send a heartbeat every
    `heartbeat` seconds; a session silent for 3 of those is dropped. `max_frame_bytes` caps
    one reassembled reply; `max_clients` caps concurrent sessions.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        server_cert: bytes,
        server_key: bytes,
        client_ca: bytes | None = None,
        enrolment: Enrolment | None = None,
        timeout: float = 600.0,
        heartbeat: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        max_clients: int = 256,
    ) -> None:
        if timeout <= 0 or heartbeat <= 0 or chunk_bytes <= 0 or chunk_bytes > CHUNK_BYTES:
            raise ValueError("timeout and heartbeat must be > 0 and chunk_bytes in (0, 1 MiB]")
        if enrolment is not None and enrolment != Enrolment() and client_ca is None:
            raise ValueError("an enrolment policy needs client certificates (client_ca)")
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.max_frame_bytes = max_frame_bytes
        self.chunk_bytes = chunk_bytes
        self._mutual = client_ca is not None
        self._enrolment = enrolment or Enrolment()
        self._lock = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        # Random start: a restarted server never reissues the ids of its previous life.
        self._ids = itertools.count(secrets.randbelow(1 << 48) + 1)
        self._expired: OrderedDict[int, int] = OrderedDict()  # task id -> round
        self._late: list[Reply] = []
        #: Set once the transport is closed.
        self.closed = threading.Event()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_clients + 4, thread_name_prefix="fedloom-grpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=max_clients,
        )
        pb_grpc.add_FederationServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
        credentials = grpc.ssl_server_credentials(
            [(server_key, server_cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        host = address.rsplit(":", 1)[0]
        try:
            port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self._server.start()
        threading.Thread(target=self._watch_heartbeats, daemon=True, name="fedloom-hb").start()
        #: The address clients connect to, with the port actually bound.
        self.address = f"{host}:{port}"
        self.port = port

    # -- who is connected ---------------------------------------------------------------------
    def connected(self) -> list[str]:
        """Ids of the clients connected now, sorted."""
        with self._lock:
            return sorted(self._sessions)

    def wait_for_clients(self, n: int, timeout: float | None = None) -> list[str]:
        """Block until at least `n` clients are connected or `timeout` seconds pass; return the
        connected ids (sorted; fewer than `n` after a timeout: the caller decides)."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._sessions) >= n, timeout)
            return sorted(self._sessions)

    def set_enrolment(self, enrolment: Enrolment) -> None:
        """Apply a new admission policy; connected clients it refuses are told why and
        dropped at once (their pending tasks fail)."""
        with self._lock:
            self._enrolment = enrolment
            sessions = list(self._sessions.values())
        for session in sessions:
            why = enrolment.refusal(session.client_id, session.cert)
            if why is not None:
                session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=why, fatal=True)))
                self._drop(session, f"refused ({why})")

    # -- the Transport protocol ---------------------------------------------------------------
    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Send each task to its client; yield one reply per task, in arrival order.

        Each distinct model or broadcast vector among the tasks is encoded and chunked once,
        and sent to each session once, ahead of the first task that needs it."""
        if not tasks:
            return
        try:
            spec = local_spec(local)
        except FrameError as exc:
            for task in tasks:
                yield _failure(task.client_id, str(exc))
            return
        deadline = time.monotonic() + self.timeout
        results: _Results = queue.SimpleQueue()
        waiting: dict[int, tuple[Task, _Session]] = {}
        blobs: dict[int, tuple[int, list[pb.ServerMessage], int]] = {}  # id(Params) -> blob

        def blob(params: Params) -> tuple[int, list[pb.ServerMessage], int]:
            if id(params) not in blobs:
                blob_id, data = next(self._ids), encode_blob(params)
                parts = chunks(blob_id, data, self.chunk_bytes)
                blobs[id(params)] = (blob_id, [pb.ServerMessage(blob=c) for c in parts], len(data))
            return blobs[id(params)]

        sent: dict[_Session, set[int]] = {}
        try:
            for task in tasks:
                task_id, nonce = next(self._ids), secrets.token_bytes(16)
                frame = encode_task(task_id, task, spec, lambda p: blob(p)[0], nonce)
                needed = [blob(p) for p in (task.params, *task.broadcast.values())]
                number = task.fit.round if task.fit else task.evaluate.round if task.evaluate else 0
                with self._lock:
                    session = self._sessions.get(task.client_id)
                    if session is not None and session.dropped:
                        session = None
                    if session is None:
                        messages: list[pb.ServerMessage] = []
                    else:
                        have = sent.setdefault(session, set())
                        fresh = [b for b in needed if b[0] not in have]
                        have.update(b[0] for b in fresh)
                        size = len(frame) + sum(b[2] for b in fresh)
                        session.pending[task_id] = _Pending(results, size, nonce, number)
                        messages = [m for b in fresh for m in b[1]]
                if session is None:
                    yield _failure(task.client_id, "client not connected")
                    continue
                waiting[task_id] = (task, session)
                messages += (
                    pb.ServerMessage(task=c) for c in chunks(task_id, frame, self.chunk_bytes)
                )
                session.send(*messages)
            while waiting:
                try:
                    task_id, reply = results.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if waiting.pop(task_id, None) is not None:
                    yield reply
            for task_id, (task, session) in list(waiting.items()):
                del waiting[task_id]
                self._forget(session, task_id)
                yield _failure(task.client_id, f"straggler: no reply within {self.timeout:g} s")
        finally:  # an abandoned dispatch leaves nothing pending
            for task_id, (_, session) in waiting.items():
                self._forget(session, task_id)

    def late_replies(self) -> list[Reply]:
        """Replies that came after their dispatch stopped waiting, or to tasks this server
        never sent (replayed), since the last call; never aggregated."""
        with self._lock:
            late, self._late = self._late, []
        return late

    def client_states(self) -> dict[str, ClientState]:
        """Empty: real clients keep their own state."""
        return {}

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Nothing to restore: real clients keep their own state."""

    def close(self, reason: str = "the federation is over") -> None:
        """Say goodbye to every client and stop the server. Idempotent."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            sessions = list(self._sessions.values())
        for session in sessions:
            session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=reason)))
            self._drop(session, "the server closed")
        self._server.stop(grace=2.0).wait()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions (called on gRPC's threads) --------------------------------------------------
    def _session(
        self, requests: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        """One client's stream: check the hello, register, then send what the outbox holds."""
        try:
            hello = next(requests)
        except (StopIteration, grpc.RpcError):
            return
        cert = _peer_certificate(context) if self._mutual else None
        refusal = self._refusal(hello, cert)
        if refusal is not None:
            yield pb.ServerMessage(goodbye=pb.Goodbye(reason=refusal, fatal=True))
            return
        session = _Session(hello.hello.client_id, context.peer(), cert)
        with self._lock:
            old = self._sessions.get(session.client_id)
            self._sessions[session.client_id] = session
            self._lock.notify_all()
        if old is not None:
            old.send(pb.ServerMessage(goodbye=pb.Goodbye(reason="replaced by a new session")))
            self._drop(old, "reconnected (the new session replaced this one)")
        context.add_callback(lambda: self._drop(session, "disconnected"))
        threading.Thread(
            target=self._read, args=(session, requests), daemon=True, name="fedloom-reader"
        ).start()
        welcome = pb.Welcome(protocol_version=PROTOCOL_VERSION, heartbeat_seconds=self.heartbeat)
        yield pb.ServerMessage(welcome=welcome)
        while (batch := session.outbox.get()) is not None:
            yield from batch

    def _refusal(self, message: pb.ClientMessage, cert: x509.Certificate | None) -> str | None:
        if self.closed.is_set():
            return "the server is shutting down"
        if message.WhichOneof("body") != "hello":
            return "the first message of a session must be a hello"
        hello = message.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            return (
                f"protocol version {hello.protocol_version} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})"
            )
        cid = hello.client_id
        if not cid or len(cid) > _MAX_ID or not cid.isprintable():
            return f"client id must be 1 to {_MAX_ID} printable characters"
        if self._mutual and cert is None:
            return "no readable client certificate"
        with self._lock:
            return self._enrolment.refusal(cid, cert)

    def _read(self, session: _Session, requests: Iterator[pb.ClientMessage]) -> None:
        """Reassemble and deliver one session's replies until the stream ends."""
        assembler = Assembler(self.max_frame_bytes, digest=self._mutual)
        reason = "disconnected"
        try:
            for message in requests:
                session.last_seen = time.monotonic()
                kind = message.WhichOneof("body")
                if kind == "heartbeat":
                    continue
                if kind != "reply":
                    raise FrameError("a hello in the middle of a session")
                frame = assembler.add(message.reply)
                if frame is not None:
                    self._deliver(session, frame, assembler.digest, assembler.signature)
        except FrameError as exc:
            reason = f"protocol violation: {exc}"
            session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=reason, fatal=True)))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            reason = f"disconnected ({code.name if code else 'stream aborted'})"
        except Exception as exc:  # never let one client's stream take the server down
            reason = f"session failed: {type(exc).__name__}: {exc}"
        self._drop(session, reason)

    def _deliver(self, session: _Session, frame: bytes, digest: bytes, signature: bytes) -> None:
        cid = session.client_id
        malformed = False
        try:
            task_id, reply = decode_reply(frame)
            if reply.client_id != cid:
                raise FrameError(f"reply names client {reply.client_id!r}", task_id)
        except FrameError as exc:
            malformed = True
            with self._lock:  # unreadable task id: the client answers in order, take its oldest
                task_id = (
                    exc.task_id if exc.task_id is not None else next(iter(session.pending), -1)
                )
            reply = _failure(cid, f"rejected reply: {exc}")
            session.send(pb.ServerMessage(notice=pb.Notice(text=f"reply rejected: {exc}")))
        with self._lock:
            pending = session.pending.pop(task_id, None)
            expired = self._expired.get(task_id)
        if pending is None:
            if expired is not None:
                why = f"late reply to task {task_id} of round {expired}, after its deadline"
            else:
                why = f"reply to task {task_id}, which this server never sent (a replay?)"
            with self._lock:
                self._late.append(_failure(cid, why))
            session.send(pb.ServerMessage(notice=pb.Notice(text=f"{why}: discarded")))
            return
        cert, signed = session.cert, reply_message(pending.nonce, digest)
        if not malformed and cert is not None and not verify(cert, signature, signed):
            why = (
                f"rejected reply: its signature does not verify with client {cid!r}'s "
                "certificate (signed with another key, altered, or made for another task)"
            )
            reply = _failure(cid, why)
            session.send(pb.ServerMessage(notice=pb.Notice(text=why)))
        pending.results.put(
            (task_id, replace(reply, bytes_down=pending.bytes_down, bytes_up=len(frame)))
        )

    def _forget(self, session: _Session, task_id: int) -> None:
        with self._lock:
            pending = session.pending.pop(task_id, None)
            if pending is not None:
                self._expired[task_id] = pending.round
                while len(self._expired) > _EXPIRED_KEPT:
                    self._expired.popitem(last=False)

    def _watch_heartbeats(self) -> None:
        """Drop sessions silent for 3 heartbeat periods (a hung or vanished client)."""
        limit = 3 * self.heartbeat
        while not self.closed.wait(self.heartbeat / 2):
            now = time.monotonic()
            with self._lock:
                silent = [s for s in self._sessions.values() if now - s.last_seen > limit]
            for session in silent:
                why = f"no heartbeat for {now - session.last_seen:.1f} s"
                session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=why)))
                self._drop(session, f"went silent ({why})")

    def _drop(self, session: _Session, reason: str) -> None:
        """End a session: fail its pending tasks with `reason` and release its stream."""
        with self._lock:
            if session.dropped:
                return
            session.dropped = True
            if self._sessions.get(session.client_id) is session:
                del self._sessions[session.client_id]
            pending, session.pending = session.pending, {}
            self._lock.notify_all()
        for task_id, p in pending.items():
            why = f"client {reason} before replying"
            p.results.put((task_id, _failure(session.client_id, why, bytes_down=p.bytes_down)))
        session.outbox.put(None)


def _peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The client certificate TLS verified for this call, or None."""
    pems: object = context.auth_context().get("x509_pem_cert")
    pem = pems[0] if isinstance(pems, list) and pems else None
    try:
        return x509.load_pem_x509_certificate(pem) if isinstance(pem, bytes) else None
    except ValueError:
        return None


class _Servicer:
    """The generated servicer interface, forwarding to the transport."""

    def __init__(self, transport: GrpcTransport) -> None:
        self.transport = transport

    def Session(
        self, requests: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        return self.transport._session(requests, context)
