"""The SQLite run store: writes, reads, resume truncation, id prefixes, concurrency, schema."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedloom.store.runstore import (
    SCHEMA_VERSION,
    AmbiguousRunError,
    ClientRecord,
    Rejection,
    RoundRecord,
    RunStore,
    RunStoreError,
    UnknownRunError,
)


def make_round(r: int, n_clients: int = 3, checkpoint: str | None = None) -> RoundRecord:
    clients = tuple(
        ClientRecord(
            client_id=f"site/{n_clients - i}",  # recorded order != sorted order
            kind="fit" if i % 2 == 0 else "evaluate",
            num_examples=10 + i,
            metrics={"loss": 1.0 / (i + r), "accuracy": 0.5},
            seconds=0.25 * i,
            bytes_down=1000 + i,
            bytes_up=2000 + i,
        )
        for i in range(n_clients)
    )
    rejections = (Rejection("site/y", "non-finite update"), Rejection("site/x", "timeout"))
    return RoundRecord(
        round=r,
        metrics={"loss": 2.0 / r, "accuracy": 0.1 * r},
        num_selected=n_clients + 2,
        num_accepted=n_clients,
        bytes_down=123 * r,
        bytes_up=456 * r,
        seconds=1.5,
        checkpoint=checkpoint,
        clients=clients,
        rejections=rejections,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(tmp_path / "deep" / "dir" / "runs.db") as s:
        yield s


def test_create_record_and_read_back(store: RunStore) -> None:
    run_id = store.create_run("mnist", {"lr": 0.1, "nested": {"k": [1, 2]}}, 7, "ckpts/")
    assert len(run_id) == 8 and all(c in "0123456789abcdef" for c in run_id)
    written = [
        make_round(r, checkpoint=f"ckpts/round-{r}" if r % 2 == 0 else None) for r in (1, 2, 3)
    ]
    for rec in written:
        store.record_round(run_id, rec)
    assert store.rounds(run_id) == written
    assert store.rejections(run_id) == [(r, x) for r in (1, 2, 3) for x in written[0].rejections]
    assert store.last_round(run_id) == 3
    assert store.last_checkpoint(run_id) == (2, "ckpts/round-2")
    info = store.get_run(run_id)
    assert (info.id, info.name, info.status, info.seed) == (run_id, "mnist", "running", 7)
    assert info.config == {"lr": 0.1, "nested": {"k": [1, 2]}}
    assert info.checkpoint_dir == "ckpts/" and info.model_path is None and info.message is None
    assert info.rounds == 3 and info.last_metrics == written[-1].metrics
    (summary,) = store.list_runs()
    assert (summary.id, summary.rounds, summary.last_metrics) == (run_id, 3, written[-1].metrics)


def test_numpy_scalars_are_stored_as_plain_numbers(store: RunStore) -> None:
    run_id = store.create_run("np", {}, 0, "c")
    client = ClientRecord("a", "fit", np.int64(5), {"loss": np.float32(0.5)}, np.float64(1), 2, 3)  # type: ignore[arg-type,dict-item]
    rec = RoundRecord(np.int64(1), {"acc": np.float32(0.25)}, 1, 1, 0, 0, 0.1, None, (client,))  # type: ignore[arg-type,dict-item]
    store.record_round(run_id, rec)
    (back,) = store.rounds(run_id)
    assert back.metrics == {"acc": 0.25} and back.clients[0].metrics == {"loss": 0.5}
    assert type(back.clients[0].num_examples) is int


def test_list_runs_is_newest_first(store: RunStore) -> None:
    ids = []
    for i in range(3):
        ids.append(store.create_run(f"run{i}", {}, i, "c"))
        time.sleep(0.002)
    store.record_round(ids[1], make_round(1))
    runs = store.list_runs()
    assert [r.id for r in runs] == ids[::-1]
    assert [r.rounds for r in runs] == [0, 1, 0]
    assert runs[2].created < runs[1].created < runs[0].created


def test_empty_run_and_statuses(store: RunStore) -> None:
    run_id = store.create_run("empty", {}, 0, "c")
    assert store.last_round(run_id) == 0
    assert store.last_checkpoint(run_id) is None
    assert store.rounds(run_id) == []
    store.set_status(run_id, "finished", message="done", model_path="m.safetensors")
    store.set_status(run_id, "interrupted")  # keeps the model path, clears the message
    info = store.get_run(run_id)
    assert (info.status, info.message, info.model_path) == ("interrupted", None, "m.safetensors")
    assert info.updated >= info.created
    with pytest.raises(ValueError, match="status"):
        store.set_status(run_id, "exploded")  # type: ignore[arg-type]


def test_truncate_after_drops_later_rounds_and_their_rows(store: RunStore) -> None:
    run_id = store.create_run("r", {}, 0, "c")
    other = store.create_run("other", {}, 0, "c")
    for r in range(1, 6):
        store.record_round(run_id, make_round(r, checkpoint=f"ck{r}"))
    store.record_round(other, make_round(4))
    store.truncate_after(run_id, 2)
    assert [r.round for r in store.rounds(run_id)] == [1, 2]
    assert store.last_checkpoint(run_id) == (2, "ck2")
    assert {r for r, _ in store.rejections(run_id)} == {1, 2}
    assert store.last_round(other) == 4  # other runs untouched
    with sqlite3.connect(store.path) as raw:
        rows = raw.execute("SELECT COUNT(*) FROM clients WHERE run_id = ?", (run_id,)).fetchone()
    assert rows[0] == 2 * 3  # no orphaned client rows
    store.record_round(run_id, make_round(3))  # resumed run records round 3 again
    assert store.last_round(run_id) == 3


def test_recording_a_round_twice_is_refused_and_atomic(store: RunStore) -> None:
    run_id = store.create_run("r", {}, 0, "c")
    store.record_round(run_id, make_round(1))
    with pytest.raises(RunStoreError, match="already recorded"):
        store.record_round(run_id, make_round(1, n_clients=9))
    assert len(store.rounds(run_id)[0].clients) == 3
    good = make_round(2).clients[0]
    unbindable = ClientRecord("c", "fit", object(), {}, 0.0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):  # fails after the round row and one client row
        store.record_round(run_id, RoundRecord(2, {}, 1, 1, 0, 0, 0.0, None, (good, unbindable)))
    assert store.last_round(run_id) == 1  # nothing of the failed round was written
    with sqlite3.connect(store.path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM clients WHERE round = 2").fetchone()[0] == 0
    dup = RoundRecord(2, {"x": 1.0}, 1, 1, 0, 0, 0.0, None, (good, good))
    store.record_round(run_id, dup)  # the same client twice in one round is allowed
    assert store.rounds(run_id)[1] == dup


def test_unknown_ids_and_prefixes(store: RunStore) -> None:
    ids = [store.create_run(f"run{i}", {}, i, "c") for i in range(40)]
    with pytest.raises(UnknownRunError, match="nope") as err:
        store.get_run("nope")
    assert str(store.path) in str(err.value)
    assert isinstance(err.value, ValueError)
    for call in (store.rounds, store.rejections, store.last_round, store.last_checkpoint):
        with pytest.raises(UnknownRunError):
            call("zzzzzzzz")
    with pytest.raises(UnknownRunError):
        store.record_round("zzzzzzzz", make_round(1))
    with pytest.raises(UnknownRunError):
        store.set_status("zzzzzzzz", "failed")
    with pytest.raises(UnknownRunError):
        store.get_run("")
    target = ids[0]
    unique = next(
        target[:n] for n in range(1, 9) if sum(i.startswith(target[:n]) for i in ids) == 1
    )
    assert store.get_run(unique).id == target
    assert store.rounds(unique) == []
    # 40 random 8-hex ids: some first hex digit is shared by at least two runs
    first = [i[0] for i in ids]
    shared = next(c for c in first if first.count(c) > 1)
    with pytest.raises(AmbiguousRunError, match=f"prefix '{shared}' matches"):
        store.get_run(shared)
    with pytest.raises(UnknownRunError):  # writes need the exact id
        store.set_status(target[:7], "failed")


def test_reader_sees_writer_progress(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as writer, RunStore(path) as reader:
        run_id = writer.create_run("live", {}, 1, "c")
        assert reader.get_run(run_id).status == "running"
        for r in range(1, 4):
            writer.record_round(run_id, make_round(r))
            assert reader.last_round(run_id) == r
            assert reader.list_runs()[0].rounds == r
        writer.set_status(run_id, "finished")
        assert reader.get_run(run_id[:6]).status == "finished"


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as s:
        run_id = s.create_run("keep", {"a": 1}, 3, "c")
        s.record_round(run_id, make_round(1, checkpoint="ck1"))
        s.set_status(run_id, "failed", message="boom")
        before = (s.get_run(run_id), s.rounds(run_id), s.list_runs())
    with RunStore(path) as s:
        assert (s.get_run(run_id), s.rounds(run_id), s.list_runs()) == before


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    RunStore(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RunStoreError, match=rf"{path}.*schema version {SCHEMA_VERSION + 1}"):
        RunStore(path)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RunStoreError, match="not a usable run store"):
        RunStore(path)


def test_thousand_clients_per_round_is_fast(store: RunStore) -> None:
    run_id = store.create_run("big", {}, 0, "c")
    times = []
    for r in range(1, 6):
        rec = make_round(r, n_clients=1000)
        start = time.perf_counter()
        store.record_round(run_id, rec)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.1, times  # ~7 ms on a laptop; generous for CI noise
    assert len(store.rounds(run_id)[-1].clients) == 1000
