"""The hand-coded chunk messages are protobuf's own bytes, parse without copying, and refuse
malformed input."""

from __future__ import annotations

import pytest

from fedloom.proto import fedloom_pb2 as pb
from fedloom.runtime.frames import FrameError
from fedloom.runtime.streams import (
    BLOB,
    REPLY,
    TASK,
    Chunk,
    chunk_messages,
    parse_client_message,
    parse_server_message,
)

FRAME = bytes(range(256)) * 40  # 10 KiB


def _by_protobuf(frame: bytes, size: int, signature: bytes) -> list[pb.Chunk]:
    """The chunks of `frame` (id 300) as generated protobuf messages."""
    starts = range(0, max(len(frame), 1), size)
    return [
        pb.Chunk(
            frame_id=300,
            total_size=len(frame),
            data=frame[s : s + size],
            last=s + size >= len(frame),
            signature=signature if s + size >= len(frame) else b"",
        )
        for s in starts
    ]


@pytest.mark.parametrize("size", [1, 7, 4096, 10240, 20000])
@pytest.mark.parametrize("signature", [b"", b"sig" * 30])
def test_chunk_messages_are_byte_for_byte_what_protobuf_writes(size: int, signature: bytes) -> None:
    expected = _by_protobuf(FRAME, size, signature)
    for field, wrap in (
        (REPLY, lambda c: pb.ClientMessage(reply=c)),
        (TASK, lambda c: pb.ServerMessage(task=c)),
        (BLOB, lambda c: pb.ServerMessage(blob=c)),
    ):
        want = [wrap(c).SerializeToString() for c in expected]
        assert chunk_messages(field, 300, [FRAME], size, signature) == want
    # the same frame given in pieces (views, empty ones) gives the same messages
    pieces = [FRAME[:5], memoryview(FRAME)[5:4099], b"", FRAME[4099:]]
    assert chunk_messages(BLOB, 300, pieces, size, signature) == chunk_messages(
        BLOB, 300, [FRAME], size, signature
    )
    empty = [pb.ServerMessage(task=c).SerializeToString() for c in _by_protobuf(b"", size, b"")]
    assert chunk_messages(TASK, 300, [b""], size) == empty == chunk_messages(TASK, 300, [], size)


def test_parsing_gives_views_of_the_received_bytes_and_other_messages_as_protobuf() -> None:
    (data,) = chunk_messages(BLOB, 7, [FRAME], signature=b"s")
    back = parse_server_message(data)
    assert isinstance(back, Chunk) and back.kind == "blob"
    assert (back.frame_id, back.total_size, back.last, back.signature) == (
        7,
        len(FRAME),
        True,
        b"s",
    )
    assert isinstance(back.data, memoryview) and back.data.obj is data and back.data == FRAME
    (data,) = chunk_messages(REPLY, 7, [FRAME])
    reply = parse_client_message(data)
    assert isinstance(reply, Chunk) and reply.kind == "reply"
    hello = pb.ClientMessage(hello=pb.Hello(client_id="c", protocol_version=2))
    assert parse_client_message(hello.SerializeToString()) == hello
    goodbye = pb.ServerMessage(goodbye=pb.Goodbye(reason="bye", come_back=True))
    assert parse_server_message(goodbye.SerializeToString()) == goodbye


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x12\x05\x08\x01", "runs past its end"),  # reply member of 5 bytes, 2 present
        (b"\x12\x02\x08\xff", "truncated or oversized varint"),
        (b"\x12\x02\x1b\x00", "wire type 3"),  # a group start inside the chunk
        (b"\x12\x02\x18\x05", "field 3 has wire type 0"),  # data sent as a varint
        (b"\x12\x01\x09", "runs past its end"),  # a fixed64 field cut short
    ],
)
def test_malformed_chunk_messages_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        parse_client_message(data)
