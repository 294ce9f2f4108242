"""LEAF's Shakespeare data set: next-character prediction, one client per (play, role).

The parse follows LEAF's preprocessing of Project Gutenberg etext #100 (see `_shakespeare_roles`);
`load_shakespeare` turns each role's lines into fixed-length character windows.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedloom.data.datasets import (
    ArrayDataset,
    CorruptDataError,
    FederatedDataset,
    _not_found,
    data_dir,
)

#: LEAF's 80-character vocabulary for Shakespeare; a character's class is its index here.
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"

_ROLE_RE = re.compile(r"^  ([a-zA-Z][a-zA-Z ]*)\. (.*)")
_CONT_RE = re.compile(r"^    (.*)")
_COE_ROLE_RE = re.compile(r"^([a-zA-Z][a-zA-Z ]*)\. (.*)")  # The Comedy of Errors is not indented
_COE_CONT_RE = re.compile(r"^(.*)")
_LAST_PLAY_LINE = 124195  # LEAF's cut-off: after this the file holds the poems and the licence
_LUT = np.full(128, ALL_LETTERS.index(" "), dtype=np.int64)
_LUT[[ord(c) for c in ALL_LETTERS]] = np.arange(len(ALL_LETTERS))


@functools.lru_cache(maxsize=2)
def _shakespeare_roles(path: str, _mtime_ns: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Split the Gutenberg text into ((client_key, lines), ...) per (play, role), in text order.

    Follows LEAF's rules: a play starts at a "by William Shakespeare" line (the title is the
    first non-blank line 2..7 lines above); a speech starts at "  NAME. text" and continues on
    lines indented by four spaces; The Comedy of Errors uses unindented variants.
    """
    with gzip.open(path, "rt", encoding="ascii", errors="replace") as f:
        lines = f.read().splitlines()[1:]
    starts = [i for i, line in enumerate(lines) if "by William Shakespeare" in line]
    if len(starts) < 2:
        raise CorruptDataError(f"{path}: no plays found (no 'by William Shakespeare' lines)")
    offset = starts[1] - 5  # skip the table of contents and the sonnets
    plays: list[tuple[str, dict[str, list[str]]]] = []
    role: str | None = None
    coe = False
    for i in range(offset, min(len(lines), _LAST_PLAY_LINE + 1)):
        line = lines[i]
        if "by William Shakespeare" in line:
            above = [lines[i - k].strip() for k in range(2, 8)]
            title = next((t for t in above if t), "")
            coe, role = title == "THE COMEDY OF ERRORS", None
            plays.append((title, {}))
            continue
        if not plays:
            continue
        match = (_COE_ROLE_RE if coe else _ROLE_RE).match(line)
        if match:
            role = match.group(1).upper()
            if coe and role.startswith("ACT "):
                role = None
            else:
                plays[-1][1].setdefault(role, []).append(match.group(2))
            continue
        if role is not None and (match := (_COE_CONT_RE if coe else _CONT_RE).match(line)):
            if coe and match.group(1).startswith("<"):
                role = None
            else:
                plays[-1][1][role].append(match.group(1))
    return tuple(
        (re.sub(r"\W+", "_", f"{title}_{name}".replace(" ", "_")), tuple(speech))
        for title, roles in plays
        if len(roles) > 1
        for name, speech in roles.items()
    )


def _encode(text: str) -> NDArray[np.int64]:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _LUT[np.minimum(codes, 127)] if len(codes) else np.zeros(0, np.int64)


def _windows(lines: Sequence[str], seq_len: int, pad_lines: bool) -> ArrayDataset:
    texts = [re.sub("  +", " ", line) + "\n" for line in lines]
    codes = _encode("".join(texts))
    pad = np.full(seq_len, _LUT[ord(" ")], dtype=np.int64)
    if not pad_lines:
        stream = np.concatenate([pad, codes])
        view = np.lib.stride_tricks.sliding_window_view(stream[:-1], seq_len)
        return ArrayDataset(view, stream[seq_len:].copy())
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    blocks = np.split(codes, np.cumsum(lengths)[:-1])
    stream = np.concatenate([part for block in blocks for part in (pad, block)])
    block_start = np.cumsum(lengths + seq_len) - lengths - seq_len
    starts = np.repeat(block_start - (np.cumsum(lengths) - lengths), lengths) + np.arange(
        len(codes)
    )
    view = np.lib.stride_tricks.sliding_window_view(stream, seq_len)
    return ArrayDataset(view[starts], stream[starts + seq_len])


def load_shakespeare(
    root: str | os.PathLike[str] | None = None,
    seq_len: int = 80,
    *,
    min_lines: int = 3,
    test_fraction: float = 0.1,
    max_clients: int | None = None,
    pad_lines: bool = False,
) -> FederatedDataset:
    """LEAF Shakespeare: one client per (play, role), next-character prediction.

    Parses `<root>/shakespeare/t8.shakespeare.txt.gz` with LEAF's rules (see `_shakespeare_roles`)
    and keeps roles with at least `min_lines` lines (LEAF: more than 2), in text order; on the
    shipped file that is 1145 clients, 4331316 samples. A client's text is its lines, runs of
    spaces collapsed and each ended by "\\n"; characters map to their index in `ALL_LETTERS`
    (unknown ones to " "). Sample t predicts character t (y, int64) from the `seq_len` characters
    before it (x, int64 (n, seq_len)), left-padded with spaces. By default the context runs across
    line ends and x is a read-only strided view (cheap); `pad_lines=True` reproduces LEAF exactly
    (context restarts at each line) but copies x (seq_len * 8 bytes per sample). Same samples
    and targets either way. The split is chronological: the last `test_fraction` of a client's
    samples (at least one) are its test set. `max_clients` keeps the first clients. The parse
    is cached in memory.
    """
    if seq_len <= 0 or min_lines <= 0 or not 0 <= test_fraction < 1:
        raise ValueError(f"bad arguments: {seq_len=}, {min_lines=}, {test_fraction=}")
    if max_clients is not None and max_clients <= 0:
        raise ValueError(f"max_clients must be positive, got {max_clients}")
    path = data_dir(root) / "shakespeare" / "t8.shakespeare.txt.gz"
    if not path.is_file():
        raise _not_found(path, "Shakespeare text", "It is Project Gutenberg etext #100 (1994).")
    merged: dict[str, list[str]] = {}
    for key, speech in _shakespeare_roles(str(path), path.stat().st_mtime_ns):
        if len(speech) >= min_lines and (key in merged or len(merged) != max_clients):
            merged.setdefault(key, []).extend(speech)
    clients = {}
    for key, lines in merged.items():
        data = _windows(lines, seq_len, pad_lines)
        n_test = min(max(int(len(data) * test_fraction), 1), len(data) - 1) if test_fraction else 0
        cut = len(data) - n_test
        clients[key] = (
            ArrayDataset(data.x[:cut], data.y[:cut]),
            ArrayDataset(data.x[cut:], data.y[cut:]),
        )
    return FederatedDataset(clients, num_classes=len(ALL_LETTERS))
