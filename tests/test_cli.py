"""The command line, run as a user runs it: real processes, a real SQLite store."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedloom.store import RunStore


def fedloom(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedloom", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fedloom {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_default_run_then_runs_and_show(tmp_path: Path) -> None:
    out = fedloom("run", cwd=tmp_path)
    assert "round" in out.stdout and "accuracy" in out.stdout and "sent" in out.stdout
    assert "round 20/20" in out.stderr  # the progress bar
    store = RunStore(tmp_path / ".fedloom" / "runs.sqlite")
    (run,) = store.list_runs()
    assert run.status == "finished" and run.rounds == 20
    assert run.last_metrics["accuracy"] > 0.9
    info = store.get_run(run.id)
    assert info.model_path is not None and Path(info.model_path).exists()
    assert set(load_file(info.model_path)) == {"weight", "bias"}
    listed = fedloom("runs", cwd=tmp_path).stdout
    assert run.id in listed and "finished" in listed
    shown = fedloom("show", run.id[:5], cwd=tmp_path).stdout
    assert "status finished" in shown and shown.count("\n") > 20


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[federation]\nfraction_fit = 2.0\n")
    proc = fedloom("run", str(config), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert f"{config}: federation.fraction_fit: must be in (0, 1]" in proc.stderr
    assert not (tmp_path / ".fedloom").exists()


def test_unknown_run_is_a_clear_error(tmp_path: Path) -> None:
    fedloom("run", cwd=tmp_path)
    proc = fedloom("show", "zzzz", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "zzzz" in proc.stderr


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_model(tmp_path: Path) -> None:
    text = (
        '[data]\ndataset = "digits"\nnum_clients = 20\n'
        "[federation]\nrounds = 60\nfraction_fit = 0.5\nmin_fit_clients = 2\nepochs = 3\n"
        "learning_rate = 0.05\nseed = 5\nfraction_evaluate = 0.5\n"
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "run.toml").write_text(text)
    fedloom("run", "run.toml", "--quiet", cwd=tmp_path / "a")

    db = tmp_path / "b" / ".fedloom" / "runs.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedloom", "run", "run.toml", "--quiet"],
        cwd=tmp_path / "b",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and done < 5:
            time.sleep(0.01)
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        done = con.execute("select count(*) from rounds").fetchone()[0]
                except sqlite3.OperationalError:
                    pass
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    store = RunStore(db)
    (run,) = store.list_runs()
    assert run.status == "running" and 5 <= run.rounds < 60, "the kill must land mid-run"
    fedloom("run", "--resume", run.id, "--quiet", cwd=tmp_path / "b")

    straight = RunStore(tmp_path / "a" / ".fedloom" / "runs.sqlite").list_runs()[0]
    a = load_file(
        RunStore(tmp_path / "a" / ".fedloom" / "runs.sqlite").get_run(straight.id).model_path
    )
    b = load_file(store.get_run(run.id).model_path)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert [r.round for r in store.rounds(run.id)] == list(range(1, 61))


def test_ctrl_c_records_the_run_as_interrupted(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        '[data]\ndataset = "digits"\nnum_clients = 10\n[federation]\nrounds = 100000\n'
        '[runtime]\nkind = "processes"\nworkers = 2\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedloom", "run", "run.toml", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / ".fedloom" / "runs.sqlite"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (db.exists() and RunStore(db).list_runs()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:  # a run that ignored the interrupt must not outlive the test
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    (run,) = RunStore(db).list_runs()
    assert proc.returncode == 130
    assert f"fedloom run --resume {run.id}" in err
    assert run.status == "interrupted" and 0 < run.rounds < 100000
