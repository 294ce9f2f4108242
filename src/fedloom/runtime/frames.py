"""Task and reply frames for remote clients, and their chunking over a gRPC stream.

A frame is `fedloom.runtime.processes.pack`'s layout: u32 header length, a JSON header and
binary blobs back to back; every array is a blob in fedloom's wire format (`fedloom.core.wire`),
never pickle. A task frame carries the task id, a fresh nonce (what the reply's signature
covers), the client id, the task kind, its typed config, the client half of the strategy by
name (`local`), and REFERENCES to the model and broadcast vectors: those travel separately, once
per session and round, as blob frames (`encode_blob`), so a round's model is encoded once for
all its clients. A reply frame carries the task id and exactly one of an update, an evaluation
or a failure.

Decoding never trusts the sender: anything malformed raises `FrameError` with a reason.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from fedloom.algorithms.base import LocalAlgorithm, PlainLocal, ProximalLocal
from fedloom.algorithms.scaffold import ScaffoldLocal
from fedloom.core.params import Params
from fedloom.core.types import (
    EvalConfig,
    Evaluation,
    Failure,
    FitConfig,
    Reply,
    Task,
    TaskKind,
    Update,
)
from fedloom.core.wire import WireError, decode, encode, encode_parts
from fedloom.runtime.messages import pack, pack_parts, unpack

#: The protocol version this fedloom speaks (`Hello.protocol_version`, `Welcome`).
PROTOCOL_VERSION = 3
#: Data bytes per chunk.
CHUNK_BYTES = 4 << 20
#: gRPC's per-message cap on both ends: one chunk plus room for the protobuf envelope.
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024
#: Default cap on one reassembled frame (a task or a reply).
MAX_FRAME_BYTES = 1 << 30

_FIT_FIELDS = ("round", "epochs", "batch_size", "learning_rate", "seed", "proximal_mu")


class FrameError(ValueError):
    """A frame or chunk is malformed; the message says why. `task_id` is set when known."""

    def __init__(self, why: str, task_id: int | None = None) -> None:
        super().__init__(why)
        self.task_id = task_id


# -- the client half, by name -------------------------------------------------------------------
def local_spec(local: LocalAlgorithm) -> dict[str, Any]:
    """Name (and hyperparameters) of a client half that remote clients know how to run.

    Raises `FrameError` for any other `LocalAlgorithm`."""
    if isinstance(local, PlainLocal):
        return {"name": "plain"}
    if isinstance(local, ProximalLocal):
        return {"name": "proximal", "mu": float(local.mu)}
    if isinstance(local, ScaffoldLocal):
        return {"name": "scaffold"}
    raise FrameError(f"client half {type(local).__name__} cannot run on remote clients yet")


def local_from_spec(spec: Any) -> LocalAlgorithm:
    """Inverse of `local_spec`; raises `FrameError` for an unknown or malformed spec."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name == "plain":
        return PlainLocal()
    if name == "proximal" and _is_number(spec.get("mu")) and spec["mu"] >= 0:
        return ProximalLocal(float(spec["mu"]))
    if name == "scaffold":
        return ScaffoldLocal()
    raise FrameError(f"unknown client half {spec!r}")


# -- tasks ------------------------------------------------------------------------------------
def encode_blob(params: Params) -> bytes:
    """A blob frame: one `Params` in the wire format (a task refers to it by its frame id)."""
    return encode(params)


def encode_task(
    task_id: int, task: Task, spec: dict[str, Any], blob_id: Callable[[Params], int], nonce: bytes
) -> bytes:
    """A task frame, referring to its model and broadcast vectors by `blob_id(params)`."""
    fit = {k: getattr(task.fit, k) for k in _FIT_FIELDS} if task.fit is not None else None
    head = {
        "task": task_id,
        "nonce": nonce.hex(),
        "client": task.client_id,
        "kind": task.kind.value,
        "fit": fit,
        "eval": asdict(task.evaluate) if task.evaluate is not None else None,
        "local": spec,
        "broadcast": list(task.broadcast),
        "blobs": [blob_id(task.params), *(blob_id(p) for p in task.broadcast.values())],
    }
    return pack(head, [])


def decode_task(
    frame: bytes, blobs: Mapping[int, bytes]
) -> tuple[int, bytes, Task, LocalAlgorithm]:
    """Parse a task frame into (task id, nonce, task, client half), taking the arrays it refers
    to from `blobs` (blob frames by id; the arrays are read-only views of them); raises
    `FrameError` (with `task_id` when it could be read) for a malformed frame or a missing
    blob."""
    head, _ = _unpack(frame, "task")
    task_id = head.get("task")
    if not isinstance(task_id, int):
        raise FrameError("task frame without an integer task id")
    try:
        nonce = bytes.fromhex(head["nonce"])
        kind = TaskKind(head["kind"])
        names = [str(n) for n in head["broadcast"]]
        refs = head["blobs"]
        if not isinstance(refs, list) or len(refs) != 1 + len(names):
            raise FrameError(f"{refs!r} as blobs for a model and {len(names)} broadcast vectors")
        missing = [r for r in refs if r not in blobs]
        if missing:
            raise FrameError(f"the task refers to blob(s) {missing} this session never received")
        arrays = [decode(blobs[r], copy=False)[0] for r in refs]  # read-only views
        fit = FitConfig(**{k: head["fit"][k] for k in _FIT_FIELDS}) if head["fit"] else None
        evaluate = EvalConfig(**head["eval"]) if head["eval"] else None
        broadcast = dict(zip(names, arrays[1:], strict=True))
        task = Task(str(head["client"]), kind, arrays[0], fit, evaluate, broadcast)
        local = local_from_spec(head["local"])
    except FrameError as exc:
        raise FrameError(str(exc), task_id) from exc
    except WireError as exc:
        raise FrameError(f"malformed array: {exc}", task_id) from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FrameError(f"malformed task: {_why(exc)}", task_id) from exc
    return task_id, nonce, task, local


# -- replies ------------------------------------------------------------------------------------
def encode_reply(task_id: int, reply: Reply) -> bytes:
    """A reply frame; an update that cannot be encoded becomes a failure."""
    return b"".join(encode_reply_parts(task_id, reply))


def encode_reply_parts(task_id: int, reply: Reply) -> list[bytes | memoryview]:
    """`encode_reply`'s bytes as pieces in order, the arrays as views (not copied)."""
    head: dict[str, Any] = {"task": task_id, "client": reply.client_id, "seconds": reply.seconds}
    if reply.failure is not None:
        return pack_parts({**head, "failure": reply.failure.reason}, [])
    if reply.evaluation is not None:
        ev = reply.evaluation
        metrics = {k: float(v) for k, v in ev.metrics.items()}
        evaluation = {"num_examples": int(ev.num_examples), "metrics": metrics}
        return pack_parts({**head, "evaluation": evaluation}, [])
    if reply.update is None:
        return pack_parts({**head, "failure": "reply carries no update"}, [])
    u = reply.update
    try:
        body = {
            "num_examples": int(u.num_examples),
            "num_steps": int(u.num_steps),
            "metrics": {k: float(v) for k, v in u.metrics.items()},
            "extras": list(u.extras),
        }
        arrays = [encode_parts(u.delta), *map(encode_parts, u.extras.values())]
        return pack_parts({**head, "update": body}, arrays)
    except Exception as exc:  # an update that cannot even be encoded is a failure
        why = f"update could not be encoded: {type(exc).__name__}: {exc}"
        return pack_parts({**head, "failure": why}, [])


def decode_reply(frame: bytes) -> tuple[int, Reply]:
    """Parse a reply frame (byte counts left 0); raises `FrameError` saying what is wrong."""
    head, blobs = _unpack(frame, "reply")
    task_id = head.get("task")
    if not isinstance(task_id, int):
        raise FrameError("reply frame without an integer task id")
    try:
        cid = str(head["client"])
        seconds = float(head.get("seconds", 0.0))
        if "failure" in head:
            return task_id, Reply(cid, failure=Failure(cid, str(head["failure"])), seconds=seconds)
        if "evaluation" in head:
            ev = head["evaluation"]
            evaluation = Evaluation(_count(ev["num_examples"]), _metrics(ev["metrics"]))
            return task_id, Reply(cid, evaluation=evaluation, seconds=seconds)
        u = head["update"]
        names = [str(n) for n in u["extras"]]
        if len(blobs) != 1 + len(names):
            raise FrameError(f"{len(blobs)} blobs for a delta and {len(names)} extras")
        delta = decode(blobs[0], copy=False)[0]
        extras = {n: decode(b, copy=False)[0] for n, b in zip(names, blobs[1:], strict=True)}
        update = Update(
            delta, _count(u["num_examples"]), _count(u["num_steps"]), _metrics(u["metrics"]), extras
        )
    except FrameError as exc:
        raise FrameError(str(exc), task_id) from exc
    except WireError as exc:
        raise FrameError(f"malformed array: {exc}", task_id) from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FrameError(f"malformed reply: {_why(exc)}", task_id) from exc
    return task_id, Reply(cid, update=update, seconds=seconds)


# -- helpers ------------------------------------------------------------------------------------
def _unpack(frame: bytes, what: str) -> tuple[dict[str, Any], list[memoryview]]:
    """`unpack`, after checking the header is an object whose blob sizes fill the frame."""
    try:
        (hlen,) = struct.unpack_from("<I", frame, 0)
        head = json.loads(bytes(frame[4 : 4 + hlen]))
        sizes = head["_blobs"] if isinstance(head, dict) else None
        if not isinstance(sizes, list) or not all(_is_count(n) for n in sizes):
            raise FrameError(f"malformed {what} frame: header lacks the blob sizes")
        if 4 + hlen + sum(sizes) != len(frame):
            raise FrameError(f"malformed {what} frame: blob sizes do not match its length")
        return unpack(frame)
    except (struct.error, ValueError, KeyError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError(f"malformed {what} frame: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> int:
    if not _is_count(value):
        raise FrameError(f"expected a count (integer >= 0), got {value!r}")
    return int(value)


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise FrameError(f"metrics must map names to numbers, got {value!r}")
    return {str(k): float(v) for k, v in value.items()}
