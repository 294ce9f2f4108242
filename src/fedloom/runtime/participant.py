"""The client side of real deployment: connect out to a `GrpcTransport` server and serve tasks.

`run_participant` opens one TLS stream to the server, says hello, and runs every task it
receives with `run_task` (the code simulation uses), one at a time, streaming each reply back
in chunks, signed with its certificate's key (`fedloom.runtime.enrolment`) when it has one.
Models arrive as blob frames that tasks refer to; it keeps the last few of the session. A
heartbeat goes out every `Welcome.heartbeat_seconds`, also while it trains. The client half
of the strategy comes by name with each task (plain, FedProx's proximal, SCAFFOLD); its state
(SCAFFOLD's c_i) lives in this process across tasks and reconnections, per round
(`StateHistory`). If the stream breaks,
it reconnects with exponential backoff, and gives up with `ParticipantError` after
`retry_for` seconds without a session.
"""

from __future__ import annotations

import gc
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import grpc

from fedloom.algorithms.base import ClientState
from fedloom.core.trainer import Trainer
from fedloom.core.types import Failure, Reply
from fedloom.proto import fedloom_pb2 as pb
from fedloom.runtime.client import run_task
from fedloom.runtime.enrolment import Signer, frame_digest, load_private_key, reply_message
from fedloom.runtime.frames import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    FrameError,
    decode_task,
    encode_reply_parts,
)
from fedloom.runtime.streams import (
    REPLY,
    TRANSFER_OPTIONS,
    Assembler,
    Chunk,
    chunk_messages,
    session_call,
)

#: Models (blob frames) a session keeps: more than one dispatch ever refers to at once.
_BLOBS_KEPT = 8


class StateHistory:
    """This client's strategy state (SCAFFOLD's c_i) after each of its last few fit rounds.

    A task for round r starts from the state after the latest round BEFORE r, so a round the
    server discarded (retried with a fresh draw, or run again after a restart from its
    checkpoint) leaves no trace, as in simulation where the federation restores the states;
    so does a round whose reply the server did not use and told it to `forget`."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._after: dict[int, ClientState] = {}

    def before(self, number: int) -> ClientState:
        """A copy of the state after the latest recorded round before `number` ({} if none)."""
        earlier = [r for r in self._after if r < number]
        return dict(self._after[max(earlier)]) if earlier else {}

    def forget(self, number: int) -> None:
        """Drop the state round `number` produced (the server did not use that reply)."""
        self._after.pop(number, None)

    def record(self, number: int, state: ClientState) -> None:
        """Keep `state` as the state after round `number` (and only the last `keep` rounds)."""
        self._after[number] = state
        for r in sorted(self._after)[: -self.keep]:
            del self._after[r]


class ParticipantError(RuntimeError):
    """The participant cannot go on: the server refused it, or could not be reached."""


class _Lost(Exception):
    def __init__(self, why: str, welcomed: bool) -> None:
        super().__init__(why)
        self.welcomed = welcomed


def _stderr(message: str) -> None:
    print(f"fedloom client: {message}", file=sys.stderr, flush=True)


def run_participant(
    server_address: str,
    client_id: str,
    trainer: Trainer,
    *,
    root_cert: bytes,
    cert_chain: bytes | None = None,
    private_key: bytes | None = None,
    retry_for: float | None = 60.0,
    backoff: tuple[float, float] = (0.5, 8.0),
    stop: threading.Event | None = None,
    log: Callable[[str], None] = _stderr,
) -> int:
    """Serve tasks from the server at `server_address` ("host:port") as `client_id`.

    `root_cert` is the PEM of the CA that signed the server's certificate; `cert_chain` and
    `private_key` (PEM) are this client's certificate for servers that require one. Returns the
    number of tasks run when the server says goodbye (the run is over) or `stop` is set.
    Raises `ParticipantError` when the server refuses this client, or when no session could be
    held for `retry_for` seconds (None: retry forever); between attempts it waits
    `backoff[0]` seconds, doubling up to `backoff[1]`.

    It calls `gc.collect()` and `gc.freeze()` first: what the process holds by then (the
    trainer, its data, the imported modules: hundreds of thousands of objects with torch)
    leaves the cyclic garbage collector's scans. Rescanning them was a fifth of all the CPU
    of a deployed round in the deployment benchmark.
    """
    gc.collect()  # first, so that no garbage cycle is frozen for good
    gc.freeze()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_cert, private_key=private_key, certificate_chain=cert_chain
    )
    try:
        signer = load_private_key(private_key) if private_key is not None else None
    except ValueError as exc:
        raise ParticipantError(f"cannot use the private key of client {client_id}: {exc}") from exc
    states = StateHistory()
    done = [0]
    stop = stop or threading.Event()
    since = time.monotonic()
    delay = backoff[0]
    while not stop.is_set():
        try:
            _session(
                server_address, client_id, trainer, credentials, signer, states, done, stop, log
            )
            return done[0]
        except _Lost as lost:
            now = time.monotonic()
            if lost.welcomed:
                since, delay = now, backoff[0]
            if retry_for is not None and now - since >= retry_for:
                raise ParticipantError(
                    f"cannot reach the server at {server_address}: {lost}"
                ) from None
            log(f"connection lost ({lost}); retrying in {delay:g} s")
            stop.wait(delay)
            delay = min(2 * delay, backoff[1])
    return done[0]


def _session(
    address: str,
    client_id: str,
    trainer: Trainer,
    credentials: grpc.ChannelCredentials,
    signer: Signer | None,
    states: StateHistory,
    done: list[int],
    stop: threading.Event,
    log: Callable[[str], None],
) -> None:
    """One session; returns on goodbye or `stop`, raises `_Lost` if the stream breaks."""
    options = [
        *TRANSFER_OPTIONS,
        # HTTP/2 pings notice a server that vanished without closing the connection.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    outbox: queue.SimpleQueue[pb.ClientMessage | bytes | None] = queue.SimpleQueue()
    hello = pb.Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION)
    outbox.put(pb.ClientMessage(hello=hello))

    def requests() -> Iterator[pb.ClientMessage | bytes]:
        while (message := outbox.get()) is not None:
            yield message

    welcomed = signing = False
    blobs: OrderedDict[int, bytes] = OrderedDict()  # this session's models, oldest first
    beating = threading.Event()  # set when the session ends: stops the heartbeats
    with grpc.secure_channel(address, credentials, options=options) as channel:
        responses = session_call(channel)(requests())
        watcher = threading.Thread(target=_cancel_on, args=(stop, responses), daemon=True)
        watcher.start()
        tasks, models = Assembler(MAX_FRAME_BYTES), Assembler(MAX_FRAME_BYTES)
        try:
            for message in responses:
                if isinstance(message, Chunk):
                    if message.kind == "blob" and (frame := models.add(message)) is not None:
                        blobs[message.frame_id] = frame
                        while len(blobs) > _BLOBS_KEPT:
                            blobs.popitem(last=False)
                    elif message.kind == "task" and (frame := tasks.add(message)) is not None:
                        task_id, nonce, reply = _serve(frame, blobs, client_id, trainer, states)
                        done[0] += 1
                        parts = encode_reply_parts(task_id, reply)  # views: no copies yet
                        sig = (
                            signer.sign(reply_message(nonce, frame_digest(parts)))
                            if signer and signing
                            else b""
                        )
                        for data in chunk_messages(REPLY, task_id, parts, CHUNK_BYTES, sig):
                            outbox.put(data)
                    continue
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    version = message.welcome.protocol_version
                    if version != PROTOCOL_VERSION:
                        raise ParticipantError(
                            f"the server speaks protocol version {version}, "
                            f"this client {PROTOCOL_VERSION}"
                        )
                    welcomed, signing = True, message.welcome.sign_replies
                    log(f"connected to {address} as {client_id}")
                    every = message.welcome.heartbeat_seconds
                    if every > 0:
                        args = (outbox, every, beating)
                        threading.Thread(target=_heartbeats, args=args, daemon=True).start()
                elif kind == "goodbye":
                    if message.goodbye.fatal:
                        raise ParticipantError(f"the server refused us: {message.goodbye.reason}")
                    if message.goodbye.come_back:
                        raise _Lost(f"{message.goodbye.reason} (it will resume)", welcomed)
                    log(f"the server said goodbye: {message.goodbye.reason}")
                    return
                elif kind == "notice":
                    log(f"server notice: {message.notice.text}")
                elif kind == "forget":
                    states.forget(message.forget.round)
        except grpc.RpcError as exc:
            if stop.is_set():
                return
            raise _Lost(_describe(exc), welcomed) from exc
        except FrameError as exc:
            raise _Lost(f"bad task stream from the server: {exc}", welcomed) from exc
        finally:
            beating.set()
            outbox.put(None)
            if not stop.is_set():
                responses.cancel()
    if stop.is_set():
        return
    raise _Lost("the server closed the stream", welcomed)


def _serve(
    frame: bytes,
    blobs: OrderedDict[int, bytes],
    client_id: str,
    trainer: Trainer,
    states: StateHistory,
) -> tuple[int, bytes, Reply]:
    """Run one task frame: (task id, nonce, reply); a task that cannot be read becomes a
    failure reply (nonce empty when unreadable)."""
    try:
        task_id, nonce, task, local = decode_task(frame, blobs)
    except FrameError as exc:
        return (exc.task_id or 0), b"", Reply(client_id, failure=Failure(client_id, str(exc)))
    if task.client_id != client_id:
        why = f"task addressed to {task.client_id!r}, this is {client_id!r}"
        return task_id, nonce, Reply(client_id, failure=Failure(client_id, why))
    if task.fit is None:
        return task_id, nonce, run_task(trainer, task, local, {})
    state = states.before(task.fit.round)
    reply = run_task(trainer, task, local, state)
    if reply.failure is None:
        states.record(task.fit.round, state)
    return task_id, nonce, reply


def _heartbeats(
    outbox: queue.SimpleQueue[pb.ClientMessage | bytes | None], every: float, stop: threading.Event
) -> None:
    """Queue a heartbeat every `every` seconds until `stop` is set."""
    while not stop.wait(every):
        outbox.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))


def _cancel_on(stop: threading.Event, call: object) -> None:
    """Cancel the session's call once `stop` is set (or the call is done)."""
    done = getattr(call, "done", lambda: True)
    while not done():
        if stop.wait(0.2):
            getattr(call, "cancel", lambda: None)()
            return


def _describe(exc: grpc.RpcError) -> str:
    if not isinstance(exc, grpc.Call):
        return f"{type(exc).__name__}: {exc}"
    details = exc.details() or ""
    why = f"{exc.code().name}: {details}"
    if "handshake" in details.lower() or "certificate" in details.lower():
        why += (
            " (TLS handshake failed: is the CA certificate the one that signed the server's "
            "certificate, and does the server certificate name this host?)"
        )
    elif "socket closed" in details.lower():
        why += " (did the server refuse this client's certificate?)"
    return why
