import numpy as np
import pytest

from fedloom.core.params import Params
from fedloom.core.wire import MAGIC, WireError, decode, encode, encoded_size


def sample(dtype: type = np.float32) -> Params:
    rng = np.random.default_rng(1)
    return Params.from_arrays(
        {"conv/weight": rng.normal(size=(4, 1, 3, 3)), "fc.bias": rng.normal(size=7)}, dtype
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_round_trip_is_exact(dtype: type) -> None:
    p = sample(dtype)
    q, meta = decode(encode(p, {"round": 3}))
    assert meta == {"round": 3}
    assert q.layout == p.layout
    assert q.flat.tobytes() == p.flat.tobytes()


def test_format_is_documented_prefix_then_little_endian_buffer() -> None:
    p = sample()
    blob = encode(p)
    assert blob[:4] == MAGIC
    assert len(blob) == encoded_size(p.layout)
    assert blob[-p.nbytes :] == p.flat.astype("<f4").tobytes()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:6], "shorter than"),
        (lambda b: b[:-4], "buffer holds"),
        (lambda b: b + b"\0" * 4, "buffer holds"),
        (lambda b: b[:8] + b"[" + b[9:], "malformed header"),
        (lambda b: b[:4] + (10**9).to_bytes(4, "little") + b[8:], "header length"),
    ],
)
def test_malformed_payloads_are_rejected_with_the_part_at_fault(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=message):
        decode(mutate(encode(sample())))


def test_decoding_never_unpickles() -> None:
    import pickle

    with pytest.raises(WireError):
        decode(pickle.dumps({"w": np.zeros(3)}))


def test_decode_without_copy_is_a_read_only_view() -> None:
    blob = encode(sample())
    q, _ = decode(blob, copy=False)
    assert not q.flat.flags.writeable
    assert q.flat.tobytes() == sample().flat.tobytes()
    assert decode(blob)[0].flat.flags.writeable
