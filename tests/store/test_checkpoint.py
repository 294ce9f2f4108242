"""Checkpoint and model files: exact round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedloom.algorithms.base import ServerState
from fedloom.core.params import Params
from fedloom.store.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune,
    read_metadata,
    save_checkpoint,
    save_model,
)

# Deliberately not alphabetical, with "/" and "." in names, a scalar and an empty tensor.
NAMES = ["z.weight", "a/b/c", "layer.0/bias", "scalar", "empty", "m"]


def make_params(dtype: type = np.float32, seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), (2, 1, 2), (), (0, 3), (7,)]
    return Params.from_arrays(
        {n: rng.standard_normal(s) for n, s in zip(NAMES, shapes, strict=True)}, dtype=dtype
    )


def assert_same(a: Params, b: Params) -> None:
    assert a.layout == b.layout  # names, order, shapes and dtype
    assert a.flat.dtype == b.flat.dtype
    assert np.array_equal(a.flat, b.flat)
    for name in a:
        assert a[name].shape == b[name].shape


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_server_state_round_trip_is_exact(tmp_path: Path, dtype: type) -> None:
    params = make_params(dtype)
    state = ServerState(params, round=12, slots={"m/1": params * 0.5, "v.x": params * 2.0})
    save_checkpoint(tmp_path / "c.safetensors", state, extra_meta={"note": "hi"})
    loaded, clients, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded.round == 12
    assert_same(loaded.params, params)
    assert list(loaded.slots) == ["m/1", "v.x"]
    assert_same(loaded.slots["m/1"], params * 0.5)
    assert_same(loaded.slots["v.x"], params * 2.0)
    assert clients == {}
    assert meta == {"note": "hi"}


def test_client_states_round_trip_with_awkward_ids(tmp_path: Path) -> None:
    params = make_params(np.float64)
    small = Params.from_arrays({"c/i": np.arange(3.0)}, dtype=np.float32)
    clients = {
        "site/a": {"c_i": params * 3.0, "extra/key": small},
        "b": {},
        "slots/0": {"c_i": params},  # looks like another group's key prefix
        "": {"": small},
    }
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ServerState(params, round=3), clients)
    _, loaded, _ = load_checkpoint(path)
    assert list(loaded) == list(clients)
    for cid, cstate in clients.items():
        assert list(loaded[cid]) == list(cstate)
        for key, p in cstate.items():
            assert_same(loaded[cid][key], p)


def test_loaded_params_share_one_buffer(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ServerState(make_params()))
    loaded, _, _ = load_checkpoint(path)
    loaded.params.flat[:] = 1.0
    assert np.all(loaded.params["a/b/c"] == 1.0)


def test_reserved_metadata_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", ServerState(make_params()), extra_meta={"fedloom.x": "1"})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_old_checkpoint_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    old = make_params(seed=1)
    save_checkpoint(path, ServerState(old, round=1))

    def boom(src: str, dst: str) -> None:
        assert Path(src).exists() and Path(src).parent == tmp_path  # temp file was written
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, ServerState(make_params(seed=2), round=2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    state, _, _ = load_checkpoint(path)
    assert state.round == 1
    assert_same(state.params, old)


def test_truncated_file_raises_checkpoint_error_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ServerState(make_params(), round=4))
    data = path.read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")
    for cut in (len(data) - 1, data_start + 1, data_start, data_start - 1, 20, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(path)) as err:
            load_checkpoint(path)
        if cut >= data_start:  # header intact, tensor data cut short
            assert "is truncated" in str(err.value)


def test_missing_and_foreign_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="junk"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(CheckpointError, match=r"not a fedloom\.checkpoint"):
        load_checkpoint(plain)
    model = tmp_path / "model.safetensors"
    save_model(model, make_params())
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(model)


def test_tampered_layout_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    params = make_params()
    save_checkpoint(path, ServerState(params))
    meta = read_metadata(path)
    layout = json.loads(meta["fedloom.layout"])
    layout["params"][1].append("ghost")
    meta["fedloom.layout"] = json.dumps(layout)
    save_file(dict(load_file(str(path))), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="ghost"):
        load_checkpoint(path)
    layout["params"][1].pop()
    for dtype, error in (("float64", "not float64"), ("object", "unsupported dtype")):
        layout["params"][0] = dtype  # tensors in the file are float32
        meta["fedloom.layout"] = json.dumps(layout)
        save_file(dict(load_file(str(path))), str(path), metadata=meta)
        with pytest.raises(CheckpointError, match=error):
            load_checkpoint(path)


def test_model_round_trip_and_standard_readers(tmp_path: Path) -> None:
    params = make_params(np.float64)
    path = tmp_path / "sub" / "model.safetensors"
    save_model(path, params, meta={"task": "mnist"})
    assert_same(load_model(path), params)
    assert read_metadata(path)["task"] == "mnist"
    plain = load_file(str(path))  # any safetensors reader sees the named tensors
    assert set(plain) == set(NAMES)
    np.testing.assert_array_equal(plain["layer.0/bias"], params["layer.0/bias"])
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    assert torch_load(str(path))["a/b/c"].dtype == torch.float64


def test_load_model_reads_foreign_files_in_file_order(tmp_path: Path) -> None:
    # Hand-written file (as another tool might write it): "b" lies before "a" in the data.
    b, a = np.arange(2, dtype="<f4"), np.arange(4, dtype="<f4").reshape(2, 2) + 10
    header = {
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }
    head = json.dumps(header).encode()
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(len(head).to_bytes(8, "little") + head + b.tobytes() + a.tobytes())
    loaded = load_model(path)
    assert list(loaded) == ["b", "a"]
    assert loaded.layout.dtype == np.float32
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)
    mixed = tmp_path / "mixed.safetensors"
    save_file({"w": np.ones(2, np.float32), "n": np.ones(1, np.int64)}, str(mixed))
    with pytest.raises(CheckpointError, match="one float dtype"):
        load_model(mixed)


def test_checkpoint_paths_and_prune(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path, 12).name == "round-000012.safetensors"
    assert checkpoint_path(tmp_path, 1234567).name == "round-1234567.safetensors"
    params = make_params()
    for r in (1, 2, 3, 10, 11):
        save_checkpoint(checkpoint_path(tmp_path, r), ServerState(params, round=r))
    stale = tmp_path / ".round-000012.safetensors.abc123.tmp"
    stale.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2, 3, 10, 11]
    removed = prune(tmp_path, keep_last=2)
    assert stale in removed and not stale.exists()
    assert [r for r, _ in list_checkpoints(tmp_path)] == [10, 11]
    assert other.exists()
    assert prune(tmp_path, keep_last=5) == []
    with pytest.raises(ValueError):
        prune(tmp_path, keep_last=-1)
    assert list_checkpoints(tmp_path / "missing") == []
    assert os.listdir(tmp_path)  # sanity: directory still there
