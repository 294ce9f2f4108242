"""`RunStore`: every run, round, client result and rejection in one SQLite file.

The store uses the standard library's `sqlite3` in WAL mode, so a CLI can read a store while a
federation is writing to it (one writer, any number of readers, across processes). Each round
is written in one transaction: after a `kill -9` a round is either fully recorded or absent,
and `truncate_after` drops rounds newer than the checkpoint a resumed run starts from.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

#: Version of the schema this code writes; stored in SQLite's `user_version`.
SCHEMA_VERSION = 1

RunStatus = Literal["running", "finished", "failed", "interrupted"]
_STATUSES = ("running", "finished", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, seed INTEGER NOT NULL,
    checkpoint_dir TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
    status TEXT NOT NULL, message TEXT, model_path TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, round INTEGER NOT NULL,
    metrics TEXT NOT NULL, num_selected INTEGER NOT NULL, num_accepted INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL, bytes_up INTEGER NOT NULL, seconds REAL NOT NULL,
    checkpoint TEXT, PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, seq INTEGER NOT NULL,
    client_id TEXT NOT NULL, kind TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, seconds REAL NOT NULL, bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL, PRIMARY KEY (run_id, round, seq),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS rejections (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, seq INTEGER NOT NULL,
    client_id TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (run_id, round, seq),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE);
"""


class RunStoreError(Exception):
    """The store file is unusable, or an operation contradicts what it holds."""


class UnknownRunError(RunStoreError, ValueError):
    """No run matches the given id or id prefix."""


class AmbiguousRunError(RunStoreError, ValueError):
    """A run id prefix matches more than one run."""


@dataclass(frozen=True)
class ClientRecord:
    """One client's result in a round; `kind` is "fit" or "evaluate"."""

    client_id: str
    kind: str
    num_examples: int
    metrics: dict[str, float]
    seconds: float
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class Rejection:
    """A client whose reply was not aggregated, and why."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """One completed round: server and aggregated metrics, traffic, clients and rejections."""

    round: int
    metrics: dict[str, float]
    num_selected: int
    num_accepted: int
    bytes_down: int
    bytes_up: int
    seconds: float
    checkpoint: str | None = None
    clients: tuple[ClientRecord, ...] = ()
    rejections: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """A run at a glance (`RunStore.list_runs`); `rounds` is its last recorded round, 0 if none."""

    id: str
    name: str
    status: str
    created: datetime
    rounds: int
    last_metrics: dict[str, float]


@dataclass(frozen=True)
class RunInfo(RunSummary):
    """Everything stored about a run except its rounds (`RunStore.get_run`)."""

    updated: datetime
    config: dict[str, Any]
    seed: int
    checkpoint_dir: str
    model_path: str | None
    message: str | None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _metrics(text: str) -> dict[str, float]:
    return {str(k): float(v) for k, v in json.loads(text).items()}


_SUMMARY = (
    "id, name, status, created, (SELECT MAX(round) FROM rounds WHERE run_id = runs.id),"
    " (SELECT metrics FROM rounds WHERE run_id = runs.id ORDER BY round DESC LIMIT 1)"
)


def _summary(row: tuple[Any, ...]) -> RunSummary:
    """The `RunSummary` of the columns selected by `_SUMMARY`."""
    rid, name, status, created, last, metrics = row
    created_at = datetime.fromisoformat(created)
    return RunSummary(rid, name, status, created_at, int(last or 0), _metrics(metrics or "{}"))


def _columns(record: ClientRecord | Rejection | RoundRecord) -> tuple[Any, ...]:
    """A record's scalar fields in declaration order (the table's column order), as values
    SQLite binds: metrics dicts become JSON, NumPy scalars become Python scalars."""
    out: list[Any] = []
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, dict):
            out.append(json.dumps({str(k): float(v) for k, v in value.items()}))
        elif not isinstance(value, tuple):  # nested clients/rejections have their own tables
            out.append(value.item() if isinstance(value, np.generic) else value)
    return tuple(out)


class RunStore:
    """A run store in one SQLite file; safe to open from several processes at once.

    Contract: the constructor creates parent directories and the schema, and refuses a file
    written by a newer schema version (or one that is not a SQLite database) with a
    `RunStoreError` naming the file. Reads accept a run id or a unique prefix of one; writes
    need the exact id. One instance may be shared between threads.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self._transaction() as cur:
                version = cur.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RunStoreError(
                        f"run store {self.path} has schema version {version}, newer than "
                        f"{SCHEMA_VERSION} which this fedloom understands; upgrade fedloom"
                    )
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            cur.execute(statement)
                    cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise RunStoreError(f"{self.path} is not a usable run store: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; the instance is unusable afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed state."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _unknown(self, run_id: str) -> UnknownRunError:
        return UnknownRunError(f"no run {run_id!r} in run store {self.path}")

    def resolve(self, run_id: str) -> str:
        """The full id of the one run whose id is `run_id` or starts with it.

        Raises `UnknownRunError` if none matches, `AmbiguousRunError` if several do.
        """
        with self._read() as conn:
            sql = "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id"
            ids = [str(r[0]) for r in conn.execute(sql, (len(run_id), run_id))]
        if run_id in ids:
            return run_id
        if not ids or not run_id:
            raise self._unknown(run_id)
        if len(ids) > 1:
            raise AmbiguousRunError(
                f"run id prefix {run_id!r} matches {len(ids)} runs in {self.path}: "
                + ", ".join(ids)
            )
        return ids[0]

    def _require(self, cur: sqlite3.Cursor, run_id: str) -> None:
        if cur.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise self._unknown(run_id)

    # -- writes -------------------------------------------------------------------------------
    def create_run(
        self, name: str, config: Mapping[str, Any], seed: int, checkpoint_dir: str
    ) -> str:
        """Record a new run with status "running" and return its id (8 hex characters).

        `config` must be JSON-serialisable; it is stored as JSON and read back as a dict.
        """
        config_json = json.dumps(dict(config), sort_keys=True)
        now = _now()
        with self._transaction() as cur:
            while True:
                run_id = uuid.uuid4().hex[:8]
                if cur.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                    break
            cur.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'running', NULL, NULL)",
                (run_id, name, config_json, int(seed), checkpoint_dir, now, now),
            )
        return run_id

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        """Write a round with its client and rejection rows, atomically.

        Raises `UnknownRunError` for an unknown run and `RunStoreError` if the round is already
        recorded (call `truncate_after` first when resuming).
        """
        r = int(record.round)
        clients = [(run_id, r, i, *_columns(c)) for i, c in enumerate(record.clients)]
        rejections = [(run_id, r, i, *_columns(x)) for i, x in enumerate(record.rejections)]
        with self._transaction() as cur:
            self._require(cur, run_id)
            exists = "SELECT 1 FROM rounds WHERE run_id = ? AND round = ?"
            if cur.execute(exists, (run_id, r)).fetchone() is not None:
                raise RunStoreError(f"round {r} of run {run_id} is already recorded in {self.path}")
            cur.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (run_id, *_columns(record))
            )
            cur.executemany("INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", clients)
            cur.executemany("INSERT INTO rejections VALUES (?, ?, ?, ?, ?)", rejections)
            cur.execute("UPDATE runs SET updated = ? WHERE id = ?", (_now(), run_id))

    def truncate_after(self, run_id: str, round: int) -> None:
        """Delete every round numbered above `round`, with its clients and rejections."""
        with self._transaction() as cur:
            self._require(cur, run_id)
            cur.execute("DELETE FROM rounds WHERE run_id = ? AND round > ?", (run_id, round))

    def set_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        message: str | None = None,
        model_path: str | None = None,
    ) -> None:
        """Set a run's status; `message` replaces the stored one (None clears it), a
        `model_path` of None leaves the stored path unchanged."""
        if status not in _STATUSES:
            raise ValueError(f"unknown run status {status!r}; expected one of {_STATUSES}")
        with self._transaction() as cur:
            self._require(cur, run_id)
            cur.execute(
                "UPDATE runs SET status = ?, message = ?, model_path = COALESCE(?, model_path),"
                " updated = ? WHERE id = ?",
                (status, message, model_path, _now(), run_id),
            )

    # -- reads --------------------------------------------------------------------------------
    def last_round(self, run_id: str) -> int:
        """The highest recorded round of the run (id or unique prefix), 0 if none."""
        rid = self.resolve(run_id)
        with self._read() as conn:
            sql = "SELECT MAX(round) FROM rounds WHERE run_id = ?"
            return int(conn.execute(sql, (rid,)).fetchone()[0] or 0)

    def last_checkpoint(self, run_id: str) -> tuple[int, str] | None:
        """`(round, path)` of the newest recorded round with a checkpoint, or None."""
        rid = self.resolve(run_id)
        with self._read() as conn:
            row = conn.execute(
                "SELECT round, checkpoint FROM rounds WHERE run_id = ? AND checkpoint IS NOT NULL"
                " ORDER BY round DESC LIMIT 1",
                (rid,),
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def list_runs(self) -> list[RunSummary]:
        """All runs, newest first, with their last round and its metrics."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_SUMMARY} FROM runs ORDER BY created DESC, id").fetchall()
        return [_summary(row) for row in rows]

    def get_run(self, run_id: str) -> RunInfo:
        """Everything about one run (id or unique prefix), with its last round's metrics."""
        rid = self.resolve(run_id)
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_SUMMARY}, updated, config, seed, checkpoint_dir, model_path, message"
                " FROM runs WHERE id = ?",
                (rid,),
            ).fetchone()
        updated, config, seed, checkpoint_dir, model_path, message = row[6:]
        return RunInfo(
            **vars(_summary(row[:6])),
            updated=datetime.fromisoformat(updated),
            config=json.loads(config),
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            model_path=model_path,
            message=message,
        )

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """All recorded rounds of a run (id or unique prefix), in order, with clients and
        rejections in the order they were recorded; read as one consistent snapshot."""
        rid = self.resolve(run_id)
        clients: dict[int, list[ClientRecord]] = {}
        rejected: dict[int, list[Rejection]] = {}
        order = "WHERE run_id = ? ORDER BY round, seq"
        with self._read() as conn:
            for _, r, _, cid, kind, n, m, *rest in conn.execute(
                f"SELECT * FROM clients {order}", (rid,)
            ):
                clients.setdefault(r, []).append(ClientRecord(cid, kind, n, _metrics(m), *rest))
            for _, r, _, cid, why in conn.execute(f"SELECT * FROM rejections {order}", (rid,)):
                rejected.setdefault(r, []).append(Rejection(cid, why))
            sql = "SELECT * FROM rounds WHERE run_id = ? ORDER BY round"
            rows = conn.execute(sql, (rid,)).fetchall()
        out = []
        for _, r, m, selected, accepted, down, up, seconds, checkpoint in rows:
            cs, rs = tuple(clients.get(r, ())), tuple(rejected.get(r, ()))
            out.append(
                RoundRecord(
                    r, _metrics(m), selected, accepted, down, up, seconds, checkpoint, cs, rs
                )
            )
        return out

    def rejections(self, run_id: str) -> list[tuple[int, Rejection]]:
        """`(round, rejection)` pairs of a run (id or unique prefix), in order."""
        rid = self.resolve(run_id)
        with self._read() as conn:
            sql = "SELECT round, client_id, reason FROM rejections WHERE run_id = ?"
            rows = conn.execute(f"{sql} ORDER BY round, seq", (rid,)).fetchall()
        return [(int(r), Rejection(c, why)) for r, c, why in rows]
