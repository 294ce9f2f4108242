"""Messages between a runtime and the place its clients run (a worker process, a Ray actor,
a gRPC participant): a JSON header plus binary blobs (`pack`/`unpack`), and replies whose
arrays travel in fedloom's wire format (`reply_message`/`parse_reply`). Never pickle.

`unpack` trusts its input's framing (lengths are not validated): use it on channels the
runtime itself controls, or validate first as `fedloom.runtime.frames` does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedloom.algorithms.base import ClientState
from fedloom.core.params import Params
from fedloom.core.types import Evaluation, Failure, Reply, Task, Update
from fedloom.core.wire import decode, encode

_LEN = struct.Struct("<I")


def pack(header: dict[str, Any], blobs: Sequence[bytes]) -> bytes:
    """Frame a JSON header and binary blobs: u32 header length, header, blobs back to back."""
    return b"".join(pack_parts(header, [[b] for b in blobs]))


def pack_parts(
    header: dict[str, Any], blobs: Sequence[Sequence[bytes | memoryview]]
) -> list[bytes | memoryview]:
    """`pack`'s bytes as pieces in order, each blob given as its own pieces (not copied)."""
    header = {**header, "_blobs": [sum(len(p) for p in b) for b in blobs]}
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)) + head, *(p for b in blobs for p in b)]


def unpack(message: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    """Inverse of `pack`."""
    view = memoryview(message)
    (hlen,) = _LEN.unpack_from(view, 0)
    header: dict[str, Any] = json.loads(bytes(view[4 : 4 + hlen]))
    blobs, offset = [], 4 + hlen
    for size in header.pop("_blobs"):
        blobs.append(view[offset : offset + size])
        offset += size
    return header, blobs


def encode_named(named: dict[str, Params]) -> tuple[list[str], list[bytes]]:
    """Names and wire-format blobs of named `Params` (a client state, an update's extras)."""
    return list(named), [encode(p) for p in named.values()]


def decode_named(names: list[str], blobs: Sequence[memoryview]) -> dict[str, Params]:
    """Inverse of `encode_named`."""
    return {name: decode(blob)[0] for name, blob in zip(names, blobs, strict=True)}


def reply_message(index: int, reply: Reply, state: ClientState) -> bytes:
    """Task `index`'s reply and the client's state after it; an update that cannot be encoded
    becomes a failure."""
    head: dict[str, Any] = {
        "i": index,
        "client": reply.client_id,
        "down": reply.bytes_down,
        "up": reply.bytes_up,
        "seconds": reply.seconds,
    }
    state_names, state_blobs = encode_named(state)
    head["state"] = state_names
    blobs = list(state_blobs)
    if reply.failure is not None:
        head["failure"] = reply.failure.reason
    elif reply.evaluation is not None:
        head["evaluation"] = asdict(reply.evaluation)
    elif reply.update is not None:
        u = reply.update
        try:
            extra_names, extra_blobs = encode_named(u.extras)
            head["update"] = {
                "num_examples": int(u.num_examples),
                "num_steps": int(u.num_steps),
                "metrics": {k: float(v) for k, v in u.metrics.items()},
                "extras": extra_names,
            }
            blobs += [encode(u.delta), *extra_blobs]
        except Exception as exc:  # an update that cannot even be encoded is rejected
            head.pop("update", None)
            head["failure"] = f"update could not be encoded: {type(exc).__name__}: {exc}"
            blobs = list(state_blobs)
    return pack(head, blobs)


def parse_reply(message: bytes) -> tuple[int, Reply, ClientState]:
    """Inverse of `reply_message`: (task index, reply, client state); the delta is a read-only
    view of `message`."""
    head, blobs = unpack(message)
    n_state = len(head["state"])
    state = decode_named(head["state"], blobs[:n_state])
    common = {
        "bytes_down": head["down"],
        "bytes_up": head["up"],
        "seconds": head["seconds"],
    }
    cid = head["client"]
    if "failure" in head:
        return head["i"], Reply(cid, failure=Failure(cid, head["failure"]), **common), state
    if "evaluation" in head:
        return head["i"], Reply(cid, evaluation=Evaluation(**head["evaluation"]), **common), state
    u = head["update"]
    delta = decode(blobs[n_state], copy=False)[0]  # read-only view of the message, no copy
    extras = decode_named(u["extras"], blobs[n_state + 1 :])
    update = Update(delta, u["num_examples"], u["num_steps"], u["metrics"], extras)
    return head["i"], Reply(cid, update=update, **common), state


def lost(task: Task, why: str) -> Reply:
    """The failure reply of a task whose executor went away."""
    return Reply(task.client_id, failure=Failure(task.client_id, why))
