"""The binary wire format for `Params`: a small JSON header and one raw little-endian buffer.

Layout of an encoded message (all integers little-endian)::

    offset  size  field
    0       4     magic b"FLM1"
    4       4     header length H (uint32)
    8       H     UTF-8 JSON header: {"dtype": "<f4", "tensors": [[name, [d0, d1, ...]], ...],
                  "meta": {...}}   (meta: JSON-serialisable values chosen by the sender)
    8+H     N     raw buffer, N = total elements * itemsize, C order, little-endian

Never pickle: decoding parses JSON and reinterprets bytes, so a hostile payload can at worst be
rejected with `WireError`, never execute code.
"""

from __future__ import annotations

import functools
import json
import struct
from typing import Any

import numpy as np

from fedloom.core.params import SUPPORTED_DTYPES, Layout, Params, TensorSpec

MAGIC = b"FLM1"
_HEAD = struct.Struct("<4sI")
#: Refuse headers larger than this (a header names tensors; it is never big).
MAX_HEADER_BYTES = 16 * 1024 * 1024


class WireError(ValueError):
    """A payload is not a valid fedloom message; the message says which part is wrong."""


def _header(layout: Layout, meta: dict[str, Any] | None) -> bytes:
    return json.dumps(
        {
            "dtype": layout.dtype.newbyteorder("<").str,
            "tensors": [[s.name, list(s.shape)] for s in layout.specs],
            "meta": meta or {},
        },
        separators=(",", ":"),
    ).encode()


@functools.lru_cache(maxsize=256)
def encoded_size(layout: Layout) -> int:
    """Bytes `encode` produces for params of this layout with empty meta."""
    return _HEAD.size + len(_header(layout, None)) + layout.size * layout.dtype.itemsize


def encode(params: Params, meta: dict[str, Any] | None = None) -> bytes:
    """Serialise `params` (and optional JSON-serialisable `meta`) to bytes."""
    return b"".join(encode_parts(params, meta))


def encode_parts(params: Params, meta: dict[str, Any] | None = None) -> list[bytes | memoryview]:
    """`encode`'s bytes as pieces to be written out in order, without copying the tensor
    data (the last piece is a view of `params`, valid while it is)."""
    dtype = params.layout.dtype.newbyteorder("<")
    header = _header(params.layout, meta)
    body = np.ascontiguousarray(params.flat.astype(dtype, copy=False))
    return [_HEAD.pack(MAGIC, len(header)) + header, memoryview(body.data).cast("B")]


def decode(
    payload: bytes | bytearray | memoryview, *, copy: bool = True
) -> tuple[Params, dict[str, Any]]:
    """Parse bytes produced by `encode`; returns the params and the meta dict.

    With `copy=True` the params own their buffer. With `copy=False` (little-endian hosts) they
    are a read-only view of `payload`, which must then outlive them and stay unchanged.
    Raises `WireError` naming the first problem found: bad magic, truncated header, malformed
    JSON, unsupported dtype, or a buffer whose size does not match the declared tensors.
    """
    view = memoryview(payload)
    if len(view) < _HEAD.size:
        raise WireError(
            f"payload of {len(view)} bytes is shorter than the {_HEAD.size}-byte prefix"
        )
    magic, hlen = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if hlen > MAX_HEADER_BYTES or _HEAD.size + hlen > len(view):
        raise WireError(f"header length {hlen} exceeds the payload")
    layout, wire_dtype, meta = _parse_header(bytes(view[_HEAD.size : _HEAD.size + hlen]))
    body = view[_HEAD.size + hlen :]
    expected = layout.size * wire_dtype.itemsize
    if len(body) != expected:
        raise WireError(f"buffer holds {len(body)} bytes, tensors declare {expected}")
    flat = np.frombuffer(body, dtype=wire_dtype)
    if copy or wire_dtype != layout.dtype:
        flat = flat.astype(layout.dtype, copy=True)
    return Params(layout, flat), dict(meta)


@functools.lru_cache(maxsize=256)
def _parse_header(header: bytes) -> tuple[Layout, np.dtype[Any], dict[str, Any]]:
    """Layout, wire dtype and meta of a header (cached: a round repeats the same headers).

    Callers must copy the meta dict before handing it out.
    """
    try:
        parsed = json.loads(header)
        dtype = np.dtype(parsed["dtype"])
        specs = tuple(
            TensorSpec(str(name), tuple(int(d) for d in shape)) for name, shape in parsed["tensors"]
        )
        meta = parsed.get("meta", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed header: {exc}") from exc
    if not isinstance(meta, dict):
        raise WireError("header field 'meta' is not an object")
    native = dtype.newbyteorder("=")
    if native not in SUPPORTED_DTYPES:
        raise WireError(f"unsupported dtype {dtype}")
    if any(d < 0 for s in specs for d in s.shape):
        raise WireError("negative dimension in tensor shapes")
    return Layout(specs, native), dtype, meta
