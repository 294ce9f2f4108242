"""Checkpoints and models as safetensors files, written atomically.

A checkpoint holds a `ServerState` (global params, round, optimizer slots) and, optionally, the
persistent `ClientState` of every client. Tensor keys are `params/<name>`, `slots/<i>/<name>`
and `clients/<i>/<j>/<name>`, where `i` and `j` index the slot, client and state key lists in
the metadata entry `fedloom.layout`. Slot names and client ids therefore never need escaping,
tensor names may contain "/" or ".", and every `Params` comes back with its exact order.

A model file (`save_model`) is a plain safetensors file of the named tensors that torch, numpy
and other tools read directly; the order of the names is kept in metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedloom.algorithms.base import ClientState, ServerState
from fedloom.core.params import Layout, Params, TensorSpec

CHECKPOINT_FORMAT = "fedloom.checkpoint/1"
MODEL_FORMAT = "fedloom.model/1"
_RESERVED = "fedloom."
_DTYPES = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}
_CHECKPOINT_NAME = re.compile(r"round-(\d{6,})\.safetensors")

# A group is one `Params`: (dtype name, tensor names in order), stored as JSON in metadata.
_Group = tuple[str, list[str]]


class CheckpointError(Exception):
    """A checkpoint or model file is missing, truncated, or not what fedloom wrote."""


def _group(p: Params) -> _Group:
    return str(p.layout.dtype), list(p.layout.names)


def _parse_group(value: Any) -> _Group:
    """A `_Group` read back from metadata; raises ValueError/TypeError if malformed."""
    dtype, names = value
    if dtype not in {str(d) for d in _DTYPES.values()}:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return str(dtype), [str(n) for n in names]


def _check_meta(meta: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key.startswith(_RESERVED):
            raise ValueError(f"metadata key {key!r} uses the reserved prefix {_RESERVED!r}")
    return meta


def _atomic_save(path: Path, tensors: dict[str, Any], meta: dict[str, str]) -> None:
    """Write to a temp file in the target directory, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}  # keeps 0-d shape
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, after checking that the file
    is complete (the last tensor ends exactly at the end of the file)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: header of {n} bytes in a file of {size} bytes")
            header = json.loads(f.read(n))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: header is not an object")
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: bad header {exc}") from exc
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, expected {8 + n + end}")
    return header, meta


def _load_groups(
    path: Path, header: dict[str, Any], groups: dict[str, _Group]
) -> dict[str, Params]:
    """Read each group (prefix -> dtype and ordered names) into one `Params` buffer."""
    out: dict[str, Params] = {}
    expected = {prefix + name for prefix, (_, names) in groups.items() for name in names}
    if expected != set(header):
        unexpected = sorted(set(header) - expected)[:3]
        missing = sorted(expected - set(header))[:3]
        raise CheckpointError(f"{path}: missing tensors {missing}, unexpected {unexpected}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            for prefix, (dtype, names) in groups.items():
                found = {str(_DTYPES.get(header[prefix + n]["dtype"])) for n in names}
                if found - {dtype}:
                    raise CheckpointError(f"{path}: {prefix!r} tensors are {found}, not {dtype}")
                specs = tuple(TensorSpec(n, tuple(header[prefix + n]["shape"])) for n in names)
                params = Params.zeros(Layout(specs, np.dtype(dtype)))
                for name in names:
                    params[name][...] = f.get_tensor(prefix + name)
                out[prefix] = params
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, numpy and fedloom errors alike
        raise CheckpointError(f"{path}: unreadable tensors: {exc}") from exc
    return out


def save_checkpoint(
    path: str | Path,
    state: ServerState,
    client_states: Mapping[str, ClientState] | None = None,
    extra_meta: dict[str, str] | None = None,
) -> None:
    """Atomically write `state` and `client_states` to `path`.

    Either the complete new file replaces `path` or, if anything fails, `path` is left as it
    was and no temporary file remains. `extra_meta` keys must not start with "fedloom.".
    """
    meta = _check_meta(extra_meta)
    tensors: dict[str, Any] = {f"params/{n}": a for n, a in state.params.items()}
    slots: list[tuple[str, _Group]] = []
    for i, (slot, p) in enumerate(state.slots.items()):
        slots.append((slot, _group(p)))
        tensors.update({f"slots/{i}/{n}": a for n, a in p.items()})
    clients: list[tuple[str, list[tuple[str, _Group]]]] = []
    for i, (client_id, cstate) in enumerate((client_states or {}).items()):
        clients.append((client_id, [(key, _group(p)) for key, p in cstate.items()]))
        for j, p in enumerate(cstate.values()):
            tensors.update({f"clients/{i}/{j}/{n}": a for n, a in p.items()})
    layout = {"params": _group(state.params), "slots": slots, "clients": clients}
    meta.update(
        {
            "fedloom.format": CHECKPOINT_FORMAT,
            "fedloom.round": str(state.round),
            "fedloom.layout": json.dumps(layout),
        }
    )
    _atomic_save(Path(path), tensors, meta)


def load_checkpoint(path: str | Path) -> tuple[ServerState, dict[str, ClientState], dict[str, str]]:
    """Read a file written by `save_checkpoint`: `(state, client_states, extra_meta)`.

    Raises `CheckpointError`, naming the file, if it is missing, truncated or not a fedloom
    checkpoint.
    """
    path = Path(path)
    header, meta = _read_header(path)
    if meta.get("fedloom.format") != CHECKPOINT_FORMAT:
        found = meta.get("fedloom.format", "no fedloom.format")
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file ({found})")
    try:
        round_ = int(meta["fedloom.round"])
        layout = json.loads(meta["fedloom.layout"])
        groups = {"params/": _parse_group(layout["params"])}
        for i, (_, g) in enumerate(layout["slots"]):
            groups[f"slots/{i}/"] = _parse_group(g)
        for i, (_, keys) in enumerate(layout["clients"]):
            for j, (_, g) in enumerate(keys):
                groups[f"clients/{i}/{j}/"] = _parse_group(g)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed fedloom metadata: {exc}") from exc
    loaded = _load_groups(path, header, groups)
    slots = {slot: loaded[f"slots/{i}/"] for i, (slot, _) in enumerate(layout["slots"])}
    clients = {
        str(cid): {key: loaded[f"clients/{i}/{j}/"] for j, (key, _) in enumerate(keys)}
        for i, (cid, keys) in enumerate(layout["clients"])
    }
    state = ServerState(params=loaded["params/"], round=round_, slots=slots)
    return state, clients, {k: v for k, v in meta.items() if not k.startswith(_RESERVED)}


def save_model(path: str | Path, params: Params, meta: dict[str, str] | None = None) -> None:
    """Atomically write `params` as a plain safetensors file, keys being the tensor names.

    `meta` (str to str, keys not starting with "fedloom.") is stored in the header.
    """
    metadata = _check_meta(meta)
    metadata["fedloom.format"] = MODEL_FORMAT
    metadata["fedloom.names"] = json.dumps(list(params.layout.names))
    _atomic_save(Path(path), dict(params.items()), metadata)


def load_model(path: str | Path) -> Params:
    """Read a model file into one `Params`, in the order it was saved.

    Also reads safetensors files written by other tools, in the order their tensors lie in
    the file, provided all tensors share one float dtype. Raises `CheckpointError`.
    """
    path = Path(path)
    header, meta = _read_header(path)
    if "fedloom.names" in meta:
        names = [str(n) for n in json.loads(meta["fedloom.names"])]
    else:
        names = sorted(header, key=lambda k: int(header[k]["data_offsets"][0]))
    dtypes = {str(header[n]["dtype"]) for n in names if n in header}
    if len(dtypes) > 1 or not dtypes <= set(_DTYPES):
        raise CheckpointError(f"{path}: tensors must share one float dtype, found {dtypes}")
    dtype = str(_DTYPES[dtypes.pop()]) if dtypes else "float32"
    return _load_groups(path, header, {"": (dtype, names)})[""]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a checkpoint or model file (including "fedloom." keys)."""
    return _read_header(Path(path))[1]


def checkpoint_path(directory: str | Path, round: int) -> Path:
    """The checkpoint file for `round` in `directory`: `round-000012.safetensors`."""
    return Path(directory) / f"round-{round:06d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """`(round, path)` of every checkpoint file in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(_CHECKPOINT_NAME.fullmatch(p.name), p) for p in directory.iterdir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def prune(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, and temp files left by interrupted
    saves; return the deleted paths. Call only from the process that writes `directory`."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    checkpoints = list_checkpoints(directory)
    doomed = [p for _, p in checkpoints[: max(len(checkpoints) - keep_last, 0)]]
    doomed += sorted(Path(directory).glob(".round-*.safetensors.*.tmp"))
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
