"""The server's side of the session protocol: who is connected, what each owes, what came back.

`Sessions` is everything `GrpcTransport` knows about its clients, independent of dispatching:
it admits a hello (protocol version, id, certificate, `Enrolment`), keeps one `Session` per
client id (a new one replaces the old), reads each session's stream on its own thread
(heartbeats, reply chunks), checks every reply (decodable, from the session's client, signed
for the task's nonce with its certificate) and hands it to the dispatch waiting for it. A reply
nobody waits for any more (late, already answered, or to a task never sent) is discarded,
logged, and kept for `late_replies`. Sessions silent for 3 heartbeat periods are dropped.
Dropping a session fails its pending tasks at once, with the reason.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import grpc
from cryptography import x509

from fedloom.core.types import Failure, Reply
from fedloom.proto import fedloom_pb2 as pb
from fedloom.runtime.enrolment import Enrolment, reply_message, verify
from fedloom.runtime.frames import PROTOCOL_VERSION, FrameError, decode_reply
from fedloom.runtime.streams import Assembler, Chunk

#: What a dispatch waits on: (task id, reply).
Results = queue.SimpleQueue[tuple[int, Reply]]
MAX_ID = 256
#: Closed task ids remembered, to tell a late or replayed reply from an unknown one.
_CLOSED_KEPT = 4096


def failure(client_id: str, why: str, bytes_down: int = 0) -> Reply:
    """A `Reply` carrying a failure."""
    return Reply(client_id, failure=Failure(client_id, why), bytes_down=bytes_down)


def server_log(message: str) -> None:
    """The default log: one line on stderr."""
    print(f"fedloom server: {message}", file=sys.stderr, flush=True)


@dataclass
class Pending:
    """A task sent to a session and not answered yet."""

    results: Results
    bytes_down: int
    nonce: bytes
    round: int
    #: A fit task (its round's state is forgotten if its reply is not used).
    fit: bool


@dataclass(eq=False)
class Session:
    """One connected client's stream."""

    client_id: str
    peer: str
    #: The client's certificate (mutual TLS), which verifies its replies' signatures.
    cert: x509.Certificate | None = None
    outbox: queue.SimpleQueue[list[pb.ServerMessage | bytes] | None] = field(
        default_factory=queue.SimpleQueue
    )
    #: Tasks sent and not yet answered, in send order (the client answers in that order).
    pending: dict[int, Pending] = field(default_factory=dict)
    dropped: bool = False
    last_seen: float = field(default_factory=time.monotonic)

    def send(self, *messages: pb.ServerMessage | bytes) -> None:
        """Queue messages (or serialized ones) for the client, consecutively."""
        self.outbox.put(list(messages))


class Sessions:
    """The connected clients of one server. Thread-safe; `lock` guards every session's
    `pending` and the table itself."""

    def __init__(
        self,
        *,
        mutual: bool,
        signed: bool,
        enrolment: Enrolment,
        heartbeat: float,
        max_frame_bytes: int,
        log: Callable[[str], None] = server_log,
    ) -> None:
        self.mutual = mutual
        #: Whether replies must be signed (mutual TLS only: the certificate verifies them).
        self.signed = signed and mutual
        self.heartbeat = heartbeat
        self.max_frame_bytes = max_frame_bytes
        self.log = log
        self.lock = threading.Condition()
        #: Set once the server closes.
        self.closed = threading.Event()
        self._enrolment = enrolment
        self._table: dict[str, Session] = {}
        self._closed_tasks: OrderedDict[int, tuple[int, str]] = OrderedDict()  # id: round, how
        self._late: list[Reply] = []
        threading.Thread(target=self._watch_heartbeats, daemon=True, name="fedloom-hb").start()

    # -- queries ------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Ids of the clients connected now, sorted."""
        with self.lock:
            return sorted(self._table)

    def wait_for(self, n: int, timeout: float | None) -> list[str]:
        """Block until at least `n` clients are connected or `timeout` seconds pass."""
        with self.lock:
            self.lock.wait_for(lambda: len(self._table) >= n, timeout)
            return sorted(self._table)

    def live(self, client_id: str) -> Session | None:
        """The client's session, if connected (call with `lock` held)."""
        session = self._table.get(client_id)
        return None if session is None or session.dropped else session

    def late_replies(self) -> list[Reply]:
        """Discarded replies since the last call (late, replayed, or to unknown tasks)."""
        with self.lock:
            late, self._late = self._late, []
        return late

    # -- changes ------------------------------------------------------------------------------
    def set_enrolment(self, enrolment: Enrolment) -> None:
        """Apply a new admission policy; connected clients it refuses are told and dropped."""
        with self.lock:
            self._enrolment = enrolment
            sessions = list(self._table.values())
        for session in sessions:
            why = enrolment.refusal(session.client_id, session.cert)
            if why is not None:
                self.log(f"dropping client {session.client_id!r}: {why}")
                session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=why, fatal=True)))
                self.drop(session, f"refused ({why})")

    def forget(self, session: Session, task_id: int, how: str = "expired") -> None:
        """Stop waiting for `task_id` (its dispatch gave up or closed); the client is told to
        forget the strategy state that task's round gives it."""
        with self.lock:
            pending = session.pending.pop(task_id, None)
            if pending is not None:
                self._close_task(task_id, pending.round, how)
        if pending is not None and pending.fit:
            session.send(pb.ServerMessage(forget=pb.Forget(round=pending.round)))

    def close(self, reason: str, *, come_back: bool = False) -> None:
        """Say goodbye to every client (`come_back`: the run will resume, reconnect) and drop
        every session. Idempotent."""
        with self.lock:
            if self.closed.is_set():
                return
            self.closed.set()
            sessions = list(self._table.values())
        for session in sessions:
            goodbye = pb.Goodbye(reason=reason, come_back=come_back)
            session.send(pb.ServerMessage(goodbye=goodbye))
            self.drop(session, "the server closed")

    def drop(self, session: Session, reason: str) -> None:
        """End a session: fail its pending tasks with `reason` and release its stream."""
        with self.lock:
            if session.dropped:
                return
            session.dropped = True
            if self._table.get(session.client_id) is session:
                del self._table[session.client_id]
            pending, session.pending = session.pending, {}
            for task_id, p in pending.items():
                self._close_task(task_id, p.round, "failed")
            self.lock.notify_all()
        for task_id, p in pending.items():
            why = f"client {reason} before replying"
            p.results.put((task_id, failure(session.client_id, why, bytes_down=p.bytes_down)))
        session.outbox.put(None)

    # -- one stream (on gRPC's threads) -------------------------------------------------------
    def serve(
        self, requests: Iterator[pb.ClientMessage | Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage | bytes]:
        """One client's stream: check the hello, register, then send what the outbox holds."""
        try:
            first = next(requests)
        except (StopIteration, grpc.RpcError):
            return
        hello = first if isinstance(first, pb.ClientMessage) else pb.ClientMessage()
        cert = _peer_certificate(context) if self.mutual else None
        refusal = self._refusal(hello, cert)
        if refusal is not None:
            who = hello.hello.client_id if hello.WhichOneof("body") == "hello" else "?"
            self.log(f"refused client {who!r} from {context.peer()}: {refusal}")
            yield pb.ServerMessage(goodbye=pb.Goodbye(reason=refusal, fatal=True))
            return
        session = Session(hello.hello.client_id, context.peer(), cert)
        with self.lock:
            old = self._table.get(session.client_id)
            self._table[session.client_id] = session
            self.lock.notify_all()
        if old is not None:
            old.send(pb.ServerMessage(goodbye=pb.Goodbye(reason="replaced by a new session")))
            self.drop(old, "reconnected (the new session replaced this one)")
        context.add_callback(lambda: self.drop(session, "disconnected"))
        threading.Thread(
            target=self._read, args=(session, requests), daemon=True, name="fedloom-reader"
        ).start()
        welcome = pb.Welcome(
            protocol_version=PROTOCOL_VERSION,
            heartbeat_seconds=self.heartbeat,
            sign_replies=self.signed,
        )
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
        if not cid or len(cid) > MAX_ID or not cid.isprintable():
            return f"client id must be 1 to {MAX_ID} printable characters"
        if self.mutual and cert is None:
            return "no readable client certificate"
        with self.lock:
            return self._enrolment.refusal(cid, cert)

    def _read(self, session: Session, requests: Iterator[pb.ClientMessage | Chunk]) -> None:
        """Reassemble and deliver one session's replies until the stream ends."""
        assembler = Assembler(self.max_frame_bytes, digest=self.signed)
        reason = "disconnected"
        try:
            for message in requests:
                session.last_seen = time.monotonic()
                if isinstance(message, Chunk):
                    chunk: Chunk | pb.Chunk = message
                elif message.WhichOneof("body") == "heartbeat":
                    continue
                elif message.WhichOneof("body") == "reply":
                    chunk = message.reply
                else:
                    raise FrameError("a hello in the middle of a session")
                frame = assembler.add(chunk)
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
        self.drop(session, reason)

    def _deliver(self, session: Session, frame: bytes, digest: bytes, signature: bytes) -> None:
        """Check one reply frame and hand it to the dispatch that waits for it."""
        cid = session.client_id
        malformed = False
        try:
            task_id, reply = decode_reply(frame)
            if reply.client_id != cid:
                raise FrameError(f"reply names client {reply.client_id!r}", task_id)
        except FrameError as exc:
            malformed = True
            with self.lock:  # unreadable task id: the client answers in order, take its oldest
                task_id = (
                    exc.task_id if exc.task_id is not None else next(iter(session.pending), -1)
                )
            reply = failure(cid, f"rejected reply: {exc}")
            session.send(pb.ServerMessage(notice=pb.Notice(text=f"reply rejected: {exc}")))
        with self.lock:
            pending = session.pending.pop(task_id, None)
            if pending is not None:
                self._close_task(task_id, pending.round, "answered")
            closed = self._closed_tasks.get(task_id)
        if pending is None:
            if closed is None:
                why = f"reply to task {task_id}, which this server never sent"
            elif closed[1] == "answered":
                why = f"second reply to task {task_id} of round {closed[0]} (a replay?)"
            else:
                why = f"late reply to task {task_id} of round {closed[0]} (it {closed[1]})"
            self._discard(session, why)
            return
        cert, message = session.cert, reply_message(pending.nonce, digest)
        if self.signed and not malformed and cert and not verify(cert, signature, message):
            why = (
                f"rejected reply: its signature does not verify with client {cid!r}'s "
                "certificate (signed with another key, altered, or made for another task)"
            )
            self.log(f"client {cid!r}: {why}")
            reply = failure(cid, why)
            session.send(pb.ServerMessage(notice=pb.Notice(text=why)))
        pending.results.put(
            (task_id, replace(reply, bytes_down=pending.bytes_down, bytes_up=len(frame)))
        )

    def _discard(self, session: Session, why: str) -> None:
        self.log(f"client {session.client_id!r}: {why}: discarded")
        with self.lock:
            self._late.append(failure(session.client_id, why))
        session.send(pb.ServerMessage(notice=pb.Notice(text=f"{why}: discarded")))

    def _close_task(self, task_id: int, number: int, how: str) -> None:
        """Remember a closed task (call with `lock` held)."""
        self._closed_tasks[task_id] = (number, how)
        while len(self._closed_tasks) > _CLOSED_KEPT:
            self._closed_tasks.popitem(last=False)

    def _watch_heartbeats(self) -> None:
        """Drop sessions silent for 3 heartbeat periods (a hung or vanished client)."""
        limit = 3 * self.heartbeat
        while not self.closed.wait(self.heartbeat / 2):
            now = time.monotonic()
            with self.lock:
                silent = [s for s in self._table.values() if now - s.last_seen > limit]
            for session in silent:
                why = f"no heartbeat for {now - session.last_seen:.1f} s"
                self.log(f"dropping client {session.client_id!r}: {why}")
                session.send(pb.ServerMessage(goodbye=pb.Goodbye(reason=why)))
                self.drop(session, f"went silent ({why})")


def _peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The client certificate TLS verified for this call, or None."""
    pems: object = context.auth_context().get("x509_pem_cert")
    pem = pems[0] if isinstance(pems, list) and pems else None
    try:
        return x509.load_pem_x509_certificate(pem) if isinstance(pem, bytes) else None
    except ValueError:
        return None
