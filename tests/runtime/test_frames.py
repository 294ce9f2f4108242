"""Task and reply frames for remote clients: round trips, chunking, and hostile input."""

from __future__ import annotations

import numpy as np
import pytest
from toy import initial

from fedloom.algorithms import PlainLocal, ProximalLocal, ScaffoldLocal
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
from fedloom.proto import fedloom_pb2 as pb
from fedloom.runtime.frames import (
    FrameError,
    decode_reply,
    decode_task,
    encode_blob,
    encode_reply,
    encode_task,
    local_from_spec,
    local_spec,
)
from fedloom.runtime.messages import pack
from fedloom.runtime.streams import (
    REPLY,
    Assembler,
    Chunk,
    chunk_messages,
    parse_client_message,
)


def _round_trip(
    task: Task, spec: dict[str, object], task_id: int = 1
) -> tuple[int, bytes, Task, object]:
    """Encode `task` with its arrays as blobs (ids by position), decode it back."""
    arrays = [task.params, *task.broadcast.values()]
    blobs = {100 + i: encode_blob(p) for i, p in enumerate(arrays)}
    ids = {id(p): 100 + i for i, p in enumerate(arrays)}
    frame = encode_task(task_id, task, spec, lambda p: ids[id(p)], b"\x01" * 16)
    return decode_task(frame, blobs)


def test_a_fit_task_round_trips_with_its_broadcast_and_client_half() -> None:
    params = initial().with_flat(initial().flat + 1.5)
    control = params * -2.0
    fit = FitConfig(round=3, epochs=2, batch_size=5, learning_rate=0.2, seed=9, proximal_mu=0.1)
    task = Task("c1", TaskKind.FIT, params, fit, None, {"control": control})
    for local in (PlainLocal(), ProximalLocal(0.25), ScaffoldLocal()):
        task_id, nonce, back, back_local = _round_trip(task, local_spec(local), 42)
        assert task_id == 42 and back_local == local and nonce == b"\x01" * 16
        assert back.client_id == "c1" and back.kind is TaskKind.FIT and back.fit == fit
        np.testing.assert_array_equal(back.params.flat, params.flat)
        np.testing.assert_array_equal(back.broadcast["control"].flat, control.flat)


def test_an_evaluate_task_round_trips() -> None:
    task = Task("c1", TaskKind.EVALUATE, initial(), evaluate=EvalConfig(round=4, batch_size=7))
    _, _, back, _ = _round_trip(task, local_spec(PlainLocal()))
    assert back.evaluate == EvalConfig(4, 7) and back.fit is None


def test_a_task_that_refers_to_a_blob_never_received_is_refused() -> None:
    task = Task("c1", TaskKind.EVALUATE, initial(), evaluate=EvalConfig(round=4))
    frame = encode_task(9, task, local_spec(PlainLocal()), lambda p: 7, b"")
    with pytest.raises(FrameError, match=r"blob\(s\) \[7\] this session never received") as info:
        decode_task(frame, {8: encode_blob(initial())})
    assert info.value.task_id == 9


def test_replies_round_trip() -> None:
    delta = initial().with_flat(initial().flat + 0.5)
    update = Update(delta, 12, 3, {"loss": 0.5}, {"control_delta": delta * 2.0})
    _, back = decode_reply(encode_reply(5, Reply("c", update=update, seconds=1.5)))
    assert back.update is not None and back.seconds == 1.5
    assert (back.update.num_examples, back.update.num_steps) == (12, 3)
    np.testing.assert_array_equal(back.update.extras["control_delta"].flat, (delta * 2.0).flat)
    _, ev = decode_reply(encode_reply(6, Reply("c", evaluation=Evaluation(3, {"acc": 1.0}))))
    assert ev.evaluation == Evaluation(3, {"acc": 1.0})
    _, failed = decode_reply(encode_reply(7, Reply("c", failure=Failure("c", "boom"))))
    assert failed.failure == Failure("c", "boom")


def test_an_unknown_client_half_cannot_be_sent() -> None:
    class Custom:
        extra_names = ()

    with pytest.raises(FrameError, match="Custom cannot run on remote clients"):
        local_spec(Custom())  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="unknown client half"):
        local_from_spec({"name": "pickle"})


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"", "malformed reply frame"),
        (b"\xff\xff\xff\x00{}", "malformed reply frame"),
        (pack({"task": 1}, [b"abc"])[:-1], "blob sizes"),
        (pack({"client": "c"}, []), "without an integer task id"),
        (pack({"task": 1, "client": "c", "update": {"extras": []}}, [b"FLM1"]), "malformed"),
        (pack({"task": 1, "client": "c", "evaluation": {"num_examples": -1, "metrics": {}}}, []),
         "expected a count"),
        (pack({"task": 1, "client": "c", "update": {"num_examples": 1, "num_steps": 1,
               "metrics": {}, "extras": []}}, [b"garbage"]), "malformed array"),
    ],
)  # fmt: skip
def test_malformed_replies_are_refused_with_a_reason(frame: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode_reply(frame)


def test_chunks_reassemble_and_violations_are_refused() -> None:
    frame = bytes(range(256)) * 100
    assembler = Assembler(max_bytes=len(frame))
    parts = [parse_client_message(m) for m in chunk_messages(REPLY, 3, [frame], size=1000)]
    assert all(isinstance(c, Chunk) for c in parts)
    assert len(parts) == 26 and parts[-1].last and not parts[0].last  # type: ignore[union-attr]
    assert [assembler.add(c) for c in parts[:-1]] == [None] * 25  # type: ignore[arg-type]
    assert assembler.add(parts[-1]) == frame  # type: ignore[arg-type]
    (empty,) = chunk_messages(REPLY, 4, [b""])
    assert Assembler().add(parse_client_message(empty)) == b""  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="exceeds the cap"):
        Assembler(max_bytes=10).add(pb.Chunk(frame_id=1, total_size=11, data=b"x"))
    with pytest.raises(FrameError, match="more than the declared"):
        Assembler().add(pb.Chunk(frame_id=1, total_size=1, data=b"xy"))
    with pytest.raises(FrameError, match="ended at 1 of 2"):
        Assembler().add(pb.Chunk(frame_id=1, total_size=2, data=b"x", last=True))
    interleaved = Assembler()
    interleaved.add(pb.Chunk(frame_id=1, total_size=4, data=b"xy"))
    with pytest.raises(FrameError, match="inside frame 1"):
        interleaved.add(pb.Chunk(frame_id=2, total_size=4, data=b"zw"))
