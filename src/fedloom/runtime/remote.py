"""`GrpcTransport`: the server side of real deployment, over gRPC with TLS.

Clients connect OUT to the server (`fedloom.runtime.participant`) and keep one bidirectional
stream open (`fedloom.proto`: `Federation.Session`); the server never dials a client. Each
connected client id has one session; a new session with the same id replaces the older one.

`dispatch` sends every task to its client's session and yields replies IN THE ORDER THEY
ARRIVE (not task order): first the immediate failures (client not connected), then each reply
as its last chunk lands. A client that is not connected or disconnects, a reply that does not
arrive within `timeout` seconds of the dispatch, and a malformed or oversized reply each become
a `Reply` with a `Failure` (a value, never an exception). A client that breaks the chunk framing
or sends a frame over `max_frame_bytes` loses its session (its pending tasks fail) and is told
why; the server and the other clients go on.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.types import Failure, Reply, Task
from fedloom.proto import fedloom_pb2 as pb
from fedloom.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.runtime.frames import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Assembler,
    FrameError,
    chunks,
    decode_reply,
    encode_task,
    local_spec,
)

#: What a dispatch waits on: (task id, reply).
_Results = queue.SimpleQueue[tuple[int, Reply]]
_MAX_ID = 256


@dataclass
class _Pending:
    results: _Results
    bytes_down: int


@dataclass(eq=False)
class _Session:
    client_id: str
    peer: str
    outbox: queue.SimpleQueue[list[pb.ServerMessage] | None] = field(
        default_factory=queue.SimpleQueue
    )
    #: Tasks sent and not yet answered, in send order (the client answers in that order).
    pending: dict[int, _Pending] = field(default_factory=dict)
    dropped: bool = False

    def send(self, *messages: pb.ServerMessage) -> None:
        self.outbox.put(list(messages))


def _failure(client_id: str, why: str, bytes_down: int = 0) -> Reply:
    return Reply(client_id, failure=Failure(client_id, why), bytes_down=bytes_down)


class GrpcTransport:
    """A TLS gRPC server on `address` ("host:port"; port 0 picks a free one, see `.address`).

    `server_cert`/`server_key` are PEM bytes; with `client_ca` (PEM) every client must present
    a certificate signed by it (mutual TLS). `timeout` bounds each dispatch, in seconds.
    `max_frame_bytes` caps one reassembled reply; `max_clients` caps concurrent sessions.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        server_cert: bytes,
        server_key: bytes,
        client_ca: bytes | None = None,
        timeout: float = 600.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        max_clients: int = 256,
    ) -> None:
        if timeout <= 0 or chunk_bytes <= 0 or chunk_bytes > CHUNK_BYTES:
            raise ValueError("timeout must be > 0 and chunk_bytes in (0, 1 MiB]")
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._closed = False
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

    # -- the Transport protocol ---------------------------------------------------------------
    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Send each task to its client; yield one reply per task, in arrival order."""
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
        cache: dict[int, bytes] = {}
        try:
            for task in tasks:
                task_id = next(self._ids)
                frame = encode_task(task_id, task, spec, cache)
                with self._lock:
                    session = self._sessions.get(task.client_id)
                    if session is not None and session.dropped:
                        session = None
                    if session is not None:
                        session.pending[task_id] = _Pending(results, len(frame))
                if session is None:
                    yield _failure(task.client_id, "client not connected")
                    continue
                waiting[task_id] = (task, session)
                messages = [
                    pb.ServerMessage(task=c) for c in chunks(task_id, frame, self.chunk_bytes)
                ]
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
                yield _failure(task.client_id, f"no reply within {self.timeout:g} s")
        finally:  # an abandoned dispatch leaves nothing pending
            for task_id, (_, session) in waiting.items():
                self._forget(session, task_id)

    def client_states(self) -> dict[str, ClientState]:
        """Empty: real clients keep their own state."""
        return {}

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Nothing to restore: real clients keep their own state."""

    def close(self, reason: str = "the federation is over") -> None:
        """Say goodbye to every client and stop the server. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
        refusal = self._refusal(hello)
        if refusal is not None:
            yield pb.ServerMessage(goodbye=pb.Goodbye(reason=refusal, fatal=True))
            return
        session = _Session(hello.hello.client_id, context.peer())
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
        yield pb.ServerMessage(welcome=pb.Welcome(protocol_version=PROTOCOL_VERSION))
        while (batch := session.outbox.get()) is not None:
            yield from batch

    def _refusal(self, message: pb.ClientMessage) -> str | None:
        if self._closed:
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
        return None

    def _read(self, session: _Session, requests: Iterator[pb.ClientMessage]) -> None:
        """Reassemble and deliver one session's replies until the stream ends."""
        assembler = Assembler(self.max_frame_bytes)
        reason = "disconnected"
        try:
            for message in requests:
                if message.WhichOneof("body") != "reply":
                    raise FrameError("a hello in the middle of a session")
                frame = assembler.add(message.reply)
                if frame is not None:
                    self._deliver(session, frame)
        except FrameError as exc:
            reason = f"protocol violation: {exc}"
            session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=reason, fatal=True)))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            reason = f"disconnected ({code.name if code else 'stream aborted'})"
        except Exception as exc:  # never let one client's stream take the server down
            reason = f"session failed: {type(exc).__name__}: {exc}"
        self._drop(session, reason)

    def _deliver(self, session: _Session, frame: bytes) -> None:
        cid = session.client_id
        try:
            task_id, reply = decode_reply(frame)
            if reply.client_id != cid:
                raise FrameError(f"reply names client {reply.client_id!r}", task_id)
        except FrameError as exc:
            with self._lock:  # unreadable task id: the client answers in order, take its oldest
                task_id = (
                    exc.task_id if exc.task_id is not None else next(iter(session.pending), -1)
                )
            reply = _failure(cid, f"rejected reply: {exc}")
            session.send(pb.ServerMessage(notice=pb.Notice(text=f"reply rejected: {exc}")))
        with self._lock:
            pending = session.pending.pop(task_id, None)
        if pending is None:
            text = f"reply to task {task_id} ignored: no such task pending (late or unknown)"
            session.send(pb.ServerMessage(notice=pb.Notice(text=text)))
            return
        pending.results.put(
            (task_id, replace(reply, bytes_down=pending.bytes_down, bytes_up=len(frame)))
        )

    def _forget(self, session: _Session, task_id: int) -> None:
        with self._lock:
            session.pending.pop(task_id, None)

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


class _Servicer:
    """The generated servicer interface, forwarding to the transport."""

    def __init__(self, transport: GrpcTransport) -> None:
        self.transport = transport

    def Session(
        self, requests: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        return self.transport._session(requests, context)
