"""`GrpcTransport`: the server side of real deployment, over gRPC with TLS.

Clients connect OUT to the server (`fedloom.runtime.participant`) and keep one bidirectional
stream open (`fedloom.proto`: `Federation.Session`); the server never dials a client.
`fedloom.runtime.sessions` keeps those streams: admission (with mutual TLS a client's id is its
certificate's common name, and its `Enrolment` decides whether it may join), heartbeats, and
the checks on every reply (decodable, signed for its task's nonce by its client).

`dispatch` sends every task to its client's session and yields replies IN THE ORDER THEY
ARRIVE (not task order): first the immediate failures (client not connected), then each reply
as its last chunk lands. A client that is not connected or disconnects, goes silent, does not
reply within `timeout` seconds of the dispatch (a straggler: cut off), or sends a malformed,
oversized or wrongly signed reply each becomes a `Reply` with a `Failure` (a value, never an
exception). A client that breaks the chunk framing or sends a frame over `max_frame_bytes`
loses its session (its pending tasks fail) and is told why; the server and the other clients
go on. Replies that come after their dispatch stopped waiting are discarded and kept for
`late_replies`.

The first `dispatch` calls `gc.collect()` then `gc.freeze()`: what the server process holds
once its run is set up (modules, model, data) leaves the cyclic garbage collector's scans,
which otherwise rescan it again and again as gRPC's per-message objects come and go.
"""

from __future__ import annotations

import gc
import itertools
import queue
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from fedloom.algorithms.base import ClientState, LocalAlgorithm
from fedloom.core.params import Params
from fedloom.core.types import Reply, Task
from fedloom.runtime.enrolment import Enrolment
from fedloom.runtime.frames import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    FrameError,
    encode_blob,
    encode_task,
    local_spec,
)
from fedloom.runtime.sessions import Pending, Results, Session, Sessions, failure, server_log
from fedloom.runtime.streams import BLOB, TASK, TRANSFER_OPTIONS, chunk_messages, server_handler

#: A model or broadcast vector encoded once per dispatch: (blob id, its messages, bytes).
_Blob = tuple[int, list[bytes], int]


class GrpcTransport:
    """A TLS gRPC server on `address` ("host:port"; port 0 picks a free one, see `.address`).

    `server_cert`/`server_key` are PEM bytes; with `client_ca` (PEM) every client must present
    a certificate signed by it (mutual TLS), named for its client id, admitted by `enrolment`
    (default: every certified client), and sign its replies (unless `signed_replies` is off:
    then TLS alone vouches for them). `timeout` bounds each dispatch, in seconds (the round's
    deadline: stragglers are cut off). Clients send a heartbeat every
    `heartbeat` seconds; a session silent for 3 of those is dropped. `max_frame_bytes` caps
    one reassembled reply; `max_clients` caps concurrent sessions. Refusals, drops and
    discarded replies go to `log` (default: stderr).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        server_cert: bytes,
        server_key: bytes,
        client_ca: bytes | None = None,
        enrolment: Enrolment | None = None,
        signed_replies: bool = True,
        timeout: float = 600.0,
        heartbeat: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        max_clients: int = 256,
        log: Callable[[str], None] = server_log,
    ) -> None:
        if timeout <= 0 or heartbeat <= 0 or chunk_bytes <= 0 or chunk_bytes > CHUNK_BYTES:
            raise ValueError("timeout and heartbeat must be > 0 and chunk_bytes in (0, 4 MiB]")
        if enrolment is not None and enrolment != Enrolment() and client_ca is None:
            raise ValueError("an enrolment policy needs client certificates (client_ca)")
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.sessions = Sessions(
            mutual=client_ca is not None,
            signed=signed_replies,
            enrolment=enrolment or Enrolment(),
            heartbeat=heartbeat,
            max_frame_bytes=max_frame_bytes,
            log=log,
        )
        #: Set once the transport is closed.
        self.closed = self.sessions.closed
        # Random 48-bit start: a restarted server practically never reuses its previous ids.
        self._ids = itertools.count(secrets.randbelow(1 << 48) + 1)
        self._frozen = False  # gc.freeze() done (first dispatch)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_clients + 4, thread_name_prefix="fedloom-grpc"),
            options=[
                *TRANSFER_OPTIONS,
                # a second server on the same port fails instead of sharing it silently
                ("grpc.so_reuseport", 0),
                # accept the participants' keepalive pings (every 20 s)
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
            maximum_concurrent_rpcs=max_clients,
        )
        self._server.add_generic_rpc_handlers((server_handler(self.sessions.serve),))
        credentials = grpc.ssl_server_credentials(
            [(server_key, server_cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        host = address.rsplit(":", 1)[0]
        try:
            port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            self.sessions.close("the server could not start")
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            self.sessions.close("the server could not start")
            raise OSError(f"cannot listen on {address}")
        self._server.start()
        #: The address clients connect to, with the port actually bound.
        self.address = f"{host}:{port}"
        self.port = port

    # -- who is connected ---------------------------------------------------------------------
    def connected(self) -> list[str]:
        """Ids of the clients connected now, sorted."""
        return self.sessions.ids()

    def wait_for_clients(self, n: int, timeout: float | None = None) -> list[str]:
        """Block until at least `n` clients are connected or `timeout` seconds pass; return the
        connected ids (sorted; fewer than `n` after a timeout: the caller decides)."""
        return self.sessions.wait_for(n, timeout)

    def set_enrolment(self, enrolment: Enrolment) -> None:
        """Apply a new admission policy; connected clients it refuses are told why and
        dropped at once (their pending tasks fail)."""
        self.sessions.set_enrolment(enrolment)

    # -- the Transport protocol ---------------------------------------------------------------
    def dispatch(self, tasks: Sequence[Task], local: LocalAlgorithm) -> Iterator[Reply]:
        """Send each task to its client; yield one reply per task, in arrival order.

        Each distinct model or broadcast vector among the tasks is encoded and chunked once,
        and sent to each session once, ahead of the first task that needs it."""
        if not tasks:
            return
        if not self._frozen:  # collect first, so no garbage cycle is frozen for good
            gc.collect()
            gc.freeze()
            self._frozen = True
        try:
            spec = local_spec(local)
        except FrameError as exc:
            for task in tasks:
                yield failure(task.client_id, str(exc))
            return
        deadline = time.monotonic() + self.timeout
        results: Results = queue.SimpleQueue()
        waiting: dict[int, tuple[Task, Session]] = {}
        blobs: dict[int, _Blob] = {}  # by id() of the Params
        sent: dict[Session, set[int]] = {}  # blob ids each session has been sent

        def blob(params: Params) -> _Blob:
            if id(params) not in blobs:
                blob_id, data = next(self._ids), encode_blob(params)
                messages = chunk_messages(BLOB, blob_id, [data], self.chunk_bytes)
                blobs[id(params)] = (blob_id, messages, len(data))
            return blobs[id(params)]

        try:
            for task in tasks:
                task_id, nonce = next(self._ids), secrets.token_bytes(16)
                frame = encode_task(task_id, task, spec, lambda p: blob(p)[0], nonce)
                needed = [blob(p) for p in (task.params, *task.broadcast.values())]
                number = task.fit.round if task.fit else task.evaluate.round if task.evaluate else 0
                with self.sessions.lock:
                    session = self.sessions.live(task.client_id)
                    if session is not None:
                        have = sent.setdefault(session, set())
                        fresh = [b for b in needed if b[0] not in have]
                        have.update(b[0] for b in fresh)
                        size = len(frame) + sum(b[2] for b in fresh)
                        pending = Pending(results, size, nonce, number, task.fit is not None)
                        session.pending[task_id] = pending
                if session is None:
                    yield failure(task.client_id, "client not connected")
                    continue
                waiting[task_id] = (task, session)
                messages = [m for b in fresh for m in b[1]]
                messages += chunk_messages(TASK, task_id, [frame], self.chunk_bytes)
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
                self.sessions.forget(session, task_id, f"missed the {self.timeout:g} s deadline")
                yield failure(task.client_id, f"straggler: no reply within {self.timeout:g} s")
        finally:  # an abandoned dispatch (a closed round) leaves nothing pending
            for task_id, (_, session) in waiting.items():
                self.sessions.forget(session, task_id, "came after its round closed")

    def late_replies(self) -> list[Reply]:
        """Replies that came after their dispatch stopped waiting, or to tasks this server
        never sent or that were answered already (replayed), since the last call; each is a
        failure saying which, never aggregated."""
        return self.sessions.late_replies()

    def client_states(self) -> dict[str, ClientState]:
        """Empty: real clients keep their own state."""
        return {}

    def restore_client_states(self, states: dict[str, ClientState]) -> None:
        """Nothing to restore: real clients keep their own state."""

    def close(self, reason: str = "the federation is over", *, come_back: bool = False) -> None:
        """Say goodbye to every client and stop the server. With `come_back` the clients are
        told the run is not over (the server will resume it): they keep reconnecting.
        Idempotent."""
        if self.closed.is_set():
            return
        self.sessions.close(reason, come_back=come_back)
        self._server.stop(grace=2.0).wait()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
