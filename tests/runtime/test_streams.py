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
    chunk_message,
    chunk_messages,
    chunks,
    parse_client_message,
    parse_server_message,
)

FRAME = bytes(range(256)) * 40  # 10 KiB


@pytest.mark.parametrize("signature", [b"", b"sig" * 30])
def test_chunk_messages_are_byte_for_byte_what_protobuf_writes(signature: bytes) -> None:
    for chunk in chunks(300, FRAME, size=4096, signature=signature):
        as_pb = pb.Chunk(
            frame_id=300, total_size=len(FRAME), data=bytes(chunk.data), last=chunk.last,
            signature=chunk.signature,
        )  # fmt: skip
        assert chunk_message(REPLY, chunk) == pb.ClientMessage(reply=as_pb).SerializeToString()
        assert chunk_message(TASK, chunk) == pb.ServerMessage(task=as_pb).SerializeToString()
        assert chunk_message(BLOB, chunk) == pb.ServerMessage(blob=as_pb).SerializeToString()
    empty = Chunk(0, 0, b"", True)
    assert (
        chunk_message(TASK, empty) == pb.ServerMessage(task=pb.Chunk(last=True)).SerializeToString()
    )


def test_parsing_gives_views_of_the_received_bytes_and_other_messages_as_protobuf() -> None:
    (chunk,) = chunks(7, FRAME, signature=b"s")
    data = chunk_message(BLOB, chunk)
    back = parse_server_message(data)
    assert isinstance(back, Chunk) and back.kind == "blob"
    assert (back.frame_id, back.total_size, back.last, back.signature) == (
        7,
        len(FRAME),
        True,
        b"s",
    )
    assert isinstance(back.data, memoryview) and back.data.obj is data and back.data == FRAME
    reply = parse_client_message(chunk_message(REPLY, chunk))
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


@pytest.mark.parametrize("size", [1, 7, 4096, 10240, 20000])
def test_messages_from_pieces_equal_the_messages_of_the_joined_frame(size: int) -> None:
    pieces = [FRAME[:5], memoryview(FRAME)[5:4099], b"", FRAME[4099:]]
    joined = [chunk_message(BLOB, c) for c in chunks(9, FRAME, size=size, signature=b"sig")]
    assert chunk_messages(BLOB, 9, pieces, size=size, signature=b"sig") == joined
    empty = [chunk_message(BLOB, c) for c in chunks(9, b"", size=size)]
    assert chunk_messages(BLOB, 9, [b""], size=size) == empty == chunk_messages(BLOB, 9, [], size)
