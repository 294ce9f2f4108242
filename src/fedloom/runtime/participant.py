"""The client side of real deployment: connect out to a `GrpcTransport` server and serve tasks.

`run_participant` opens one TLS stream to the server, says hello, and runs every task it
receives with `run_task` (the code simulation uses), one at a time, streaming each reply back
in chunks. The client half of the strategy comes by name with each task (plain, FedProx's
proximal, SCAFFOLD); its state (SCAFFOLD's c_i) lives in this process across tasks and
reconnections. If the stream breaks, it reconnects with exponential backoff, and gives up with
`ParticipantError` after `retry_for` seconds without a session.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from fedloom.algorithms.base import ClientState
from fedloom.core.trainer import Trainer
from fedloom.core.types import Failure, Reply
from fedloom.proto import fedloom_pb2 as pb
from fedloom.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.runtime.client import run_task
from fedloom.runtime.frames import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Assembler,
    FrameError,
    chunks,
    decode_task,
    encode_reply,
)


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
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_cert, private_key=private_key, certificate_chain=cert_chain
    )
    states: dict[str, ClientState] = {}
    done = [0]
    stop = stop or threading.Event()
    since = time.monotonic()
    delay = backoff[0]
    while not stop.is_set():
        try:
            _session(server_address, client_id, trainer, credentials, states, done, stop, log)
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
    states: dict[str, ClientState],
    done: list[int],
    stop: threading.Event,
    log: Callable[[str], None],
) -> None:
    """One session; returns on goodbye or `stop`, raises `_Lost` if the stream breaks."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    outbox: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
    hello = pb.Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION)
    outbox.put(pb.ClientMessage(hello=hello))

    def requests() -> Iterator[pb.ClientMessage]:
        while (message := outbox.get()) is not None:
            yield message

    welcomed = False
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        responses = stub.Session(requests())
        watcher = threading.Thread(target=_cancel_on, args=(stop, responses), daemon=True)
        watcher.start()
        assembler = Assembler(MAX_FRAME_BYTES)
        try:
            for message in responses:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    version = message.welcome.protocol_version
                    if version != PROTOCOL_VERSION:
                        raise ParticipantError(
                            f"the server speaks protocol version {version}, "
                            f"this client {PROTOCOL_VERSION}"
                        )
                    welcomed = True
                    log(f"connected to {address} as {client_id}")
                elif kind == "goodbye":
                    if message.goodbye.fatal:
                        raise ParticipantError(f"the server refused us: {message.goodbye.reason}")
                    log(f"the server said goodbye: {message.goodbye.reason}")
                    return
                elif kind == "notice":
                    log(f"server notice: {message.notice.text}")
                elif kind == "task":
                    frame = assembler.add(message.task)
                    if frame is not None:
                        task_id, reply = _serve(frame, client_id, trainer, states)
                        done[0] += 1
                        for chunk in chunks(task_id, encode_reply(task_id, reply), CHUNK_BYTES):
                            outbox.put(pb.ClientMessage(reply=chunk))
        except grpc.RpcError as exc:
            if stop.is_set():
                return
            raise _Lost(_describe(exc), welcomed) from exc
        except FrameError as exc:
            raise _Lost(f"bad task stream from the server: {exc}", welcomed) from exc
        finally:
            outbox.put(None)
            if not stop.is_set():
                responses.cancel()
    if stop.is_set():
        return
    raise _Lost("the server closed the stream", welcomed)


def _serve(
    frame: bytes, client_id: str, trainer: Trainer, states: dict[str, ClientState]
) -> tuple[int, Reply]:
    """Run one task frame; a task that cannot be read becomes a failure reply."""
    try:
        task_id, task, local = decode_task(frame)
    except FrameError as exc:
        return (exc.task_id or 0), Reply(client_id, failure=Failure(client_id, str(exc)))
    if task.client_id != client_id:
        why = f"task addressed to {task.client_id!r}, this is {client_id!r}"
        return task_id, Reply(client_id, failure=Failure(client_id, why))
    return task_id, run_task(trainer, task, local, states.setdefault(client_id, {}))


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
