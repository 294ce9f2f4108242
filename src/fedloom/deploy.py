"""`fedloom server` and `fedloom client`: a federation over gRPC with TLS, from the command line.

The server runs a run config's strategy, rounds and evaluation over `GrpcTransport`; each
client is a separate process (on another machine, or behind NAT: clients connect out) running
`run_participant` with a trainer given as `module:function` or built from the same run config
(`--config FILE --partition K`: the K-th client of the config's data split, as simulation
builds it).

Certificates come from one folder (`fedloom certs DIR --clients ID,...` writes a test set): the
server reads `ca.pem`, `server.pem`, `server.key` and requires every client to present a
certificate signed by `ca.pem` (mutual TLS) whose common name is the client's id; a client
reads `ca.pem` and its own `clients/<id>.pem`, `clients/<id>.key`. An allow-list file narrows
who may join and a revocation file shuts clients out (`fedloom.runtime.enrolment`); the server
re-reads both when they change, and drops a revoked client's session at once.

The server survives a crash (kill -9 included). Restarted with the same command, it continues
the last run of its config (same name and settings) in the run store if that run did not
finish, from the run's last checkpoint (`plan_run`); the clients reconnect by themselves
(`run_participant` retries) and the server waits for `clients` of them again. A run that died
before its first round was checkpointed has nothing to continue: it is marked failed and a new
run starts. One server at a time may use a run store (`lock_store`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fedloom.certs import PkiFiles
from fedloom.config import ConfigError, RunConfig, parse_config
from fedloom.core.trainer import Trainer
from fedloom.runtime.enrolment import Enrolment
from fedloom.store import RunStore, RunStoreError

if TYPE_CHECKING:
    from fedloom.runtime.remote import GrpcTransport


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "(certs)", f"cannot read the {what}: {exc.strerror}") from exc


@dataclass(frozen=True)
class RunPlan:
    """What a server start does: continue `resume` (a run id) or start a new run (None), with
    `config` (the stored one when resuming); `note` says which and why, for the server's
    output."""

    config: RunConfig
    resume: str | None
    note: str


def _plain(config: dict[str, Any]) -> Any:
    """A config dict as the run store gives it back (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(config, sort_keys=True))


def plan_run(
    config: RunConfig | None, store_path: Path, *, resume: str | None = None, fresh: bool = False
) -> RunPlan:
    """Decide whether a server start continues a run or starts a new one.

    `resume` (a run id or unique prefix) continues that run with its stored config (`config`,
    if given, must equal it: `ConfigError` otherwise); a finished run, or one without a
    checkpoint, is a `RunStoreError`. `fresh` starts a new run of `config`.
    Otherwise the newest run in `store_path` with `config`'s name and exactly its settings
    (`config.to_dict()`) is continued if its status is "running" (a server killed with -9, or
    that lost its machine, leaves it so) or "interrupted" (Ctrl-C) and it has a checkpoint. If
    that run has no checkpoint (it died in round 1), it is marked failed ("superseded") and a
    new run starts; if it finished or failed, a new run starts.
    """
    if resume is not None and fresh:
        raise ConfigError("(arguments)", "--resume/--fresh", "give at most one of them")
    if resume is None and config is None:
        raise ValueError("plan_run needs a config or a run to resume")
    if config is not None and resume is None and (fresh or not store_path.exists()):
        return RunPlan(config, None, "starting a new run")
    with RunStore(store_path) as store:
        if resume is not None:
            info = store.get_run(resume)
            if info.status == "finished":
                raise RunStoreError(
                    f"run {info.id} in {store_path} already finished; its model: {info.model_path}"
                )
            found = store.last_checkpoint(info.id)
            if found is None:
                raise RunStoreError(
                    f"run {info.id} in {store_path} has no checkpoint to resume from (it stopped "
                    "before its first round was recorded); start a new run with --fresh"
                )
            stored = parse_config(info.config, f"run {info.id} in {store_path}")
            if config is not None and _plain(config.to_dict()) != info.config:
                raise ConfigError(
                    "--config",
                    "(resume)",
                    f"differs from the config stored with run {info.id}; leave --config out "
                    "to continue the run with its own",
                )
            return RunPlan(stored, info.id, _resuming(info.id, found[0]))
        assert config is not None
        wanted = _plain(config.to_dict())
        same = [
            run
            for run in store.list_runs()  # newest first
            if run.name == config.name and store.get_run(run.id).config == wanted
        ]
        if not same or same[0].status not in ("running", "interrupted"):
            return RunPlan(config, None, "starting a new run")
        last = same[0]
        found = store.last_checkpoint(last.id)
        if found is None:
            store.set_status(
                last.id,
                "failed",
                message="stopped before its first checkpoint; superseded by a new run",
            )
            return RunPlan(
                config,
                None,
                f"run {last.id} stopped before its first round was checkpointed "
                "(marked failed); starting a new run",
            )
        return RunPlan(config, last.id, _resuming(last.id, found[0]))


def _resuming(run_id: str, round_done: int) -> str:
    return f"resuming run {run_id} from its checkpoint after round {round_done}"


def lock_store(store_path: Path) -> IO[str]:
    """Take the server lock of a run store (`<store>.server.lock`, an exclusive `flock`, freed
    by the kernel when the process dies, kill -9 included) and write this process's id in it;
    keep the returned file open while serving. Raises `RunStoreError` naming the store (and the
    holder's pid) when another server holds it: two servers must not continue the same run."""
    import fcntl

    path = store_path.with_name(store_path.name + ".server.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunStoreError(
            f"another fedloom server (pid {holder}) is using run store {store_path}; "
            "stop it, or give this one another --store"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def serve(
    config: RunConfig | None,
    store_path: Path,
    *,
    address: str,
    certs: Path,
    clients: int | None,
    wait: float,
    timeout: float,
    allow: Path | None = None,
    revoked: Path | None = None,
    quiet: bool = False,
    resume: str | None = None,
    fresh: bool = False,
) -> int:
    """Listen on `address`, wait up to `wait` seconds for `clients` clients (None: the run
    config's `num_clients`), then run `config` over them (rounds, strategy, evaluation;
    recorded in `store_path`), or continue an unfinished run of it as `plan_run` decides from
    `resume` and `fresh` (`config` may be None with `resume`). The run's clients
    are the ids connected when it starts (or resumes), sorted. `allow` and `revoked` are the
    enrolment files (`Enrolment.from_files`), watched for changes while it runs. Returns the
    exit status: 0 when the run finished, 1 if too few clients came, 2 if it cannot listen.
    Raises `ConfigError`/`RunStoreError` (before listening) for bad files, an unusable store,
    a run that cannot be resumed, or a store another server is using."""
    from fedloom.experiment import run_experiment
    from fedloom.runtime.enrolment import EnrolmentError
    from fedloom.runtime.remote import GrpcTransport

    files = PkiFiles.in_folder(certs)
    try:
        enrolment = Enrolment.from_files(allow, revoked)
    except EnrolmentError as exc:
        raise ConfigError(str(exc).split(":", 1)[0], "(enrolment)", str(exc)) from exc
    lock = lock_store(store_path)
    try:
        plan = plan_run(config, store_path, resume=resume, fresh=fresh)
        try:
            transport = GrpcTransport(
                address,
                server_cert=_read(files.server_cert, "server certificate"),
                server_key=_read(files.server_key, "server key"),
                client_ca=_read(files.ca, "CA certificate"),
                timeout=timeout,
                enrolment=enrolment,
            )
        except OSError as exc:
            print(f"fedloom: error: {exc}", file=sys.stderr)
            return 2
        if allow is not None or revoked is not None:
            watch_enrolment(transport, allow, revoked)
        print(f"fedloom server: listening on {transport.address}", flush=True)
        print(f"fedloom server: {plan.note}", flush=True)
        needed = clients if clients is not None else plan.config.data.num_clients
        try:
            ids = transport.wait_for_clients(needed, wait)
        except KeyboardInterrupt:
            transport.close("the server was stopped")
            print("fedloom server: interrupted while waiting for clients", file=sys.stderr)
            return 130
        if len(ids) < needed:
            transport.close("the server gave up waiting for clients")
            print(f"fedloom server: {len(ids)} of {needed} clients connected after {wait:g} s")
            return 1
        print(f"fedloom server: {len(ids)} clients connected: {', '.join(ids)}", flush=True)
        status = 1
        try:
            status = run_experiment(
                plan.config,
                store_path,
                resume=plan.resume,
                quiet=quiet,
                transport=transport,
                client_ids=ids,
                resume_hint="fedloom server ... (the same command, or with --resume {run_id})",
            )
        finally:  # interrupted: the clients wait for the server to come back and resume
            if status == 130:
                transport.close("the server was stopped", come_back=True)
            else:
                transport.close()
        return status
    finally:
        lock.close()


def watch_enrolment(
    transport: GrpcTransport, allow: Path | None, revoked: Path | None, every: float = 1.0
) -> threading.Thread:
    """Re-read the enrolment files whenever one changes (checked every `every` seconds) and
    apply them to `transport` (revoked clients lose their sessions at once). A change is a new
    modification time or size. A file that has become unreadable or malformed keeps the
    previous policy, with a message on stderr."""
    from fedloom.runtime.enrolment import EnrolmentError

    paths = [p for p in (allow, revoked) if p is not None]

    def stamps() -> list[tuple[int, int]]:
        found = []
        for path in paths:
            try:
                info = path.stat()
                found.append((info.st_mtime_ns, info.st_size))
            except OSError:
                found.append((-1, -1))
        return found

    def loop() -> None:
        seen = stamps()
        while not transport.closed.wait(every):
            now = stamps()
            if now == seen:
                continue
            seen = now
            try:
                policy = Enrolment.from_files(allow, revoked)
            except EnrolmentError as exc:
                print(f"fedloom server: enrolment unchanged: {exc}", file=sys.stderr, flush=True)
                continue
            transport.set_enrolment(policy)
            print("fedloom server: enrolment files re-read", flush=True)

    thread = threading.Thread(target=loop, daemon=True, name="fedloom-enrolment")
    thread.start()
    return thread


def config_trainer(config: RunConfig, partition: int) -> tuple[str, Trainer]:
    """The id and trainer of client number `partition` of `config`'s data split (the same
    split, standardization and model a simulation of `config` builds)."""
    from fedloom.experiment import Clients, build_trainers, prepared_clients

    clients = prepared_clients(config)
    ids = list(clients.parts)
    if not 0 <= partition < len(ids):
        raise ConfigError(
            "--partition", "partition", f"must be in [0, {len(ids)}), got {partition}"
        )
    cid = ids[partition]
    own = Clients({cid: clients.parts[cid]}, clients.test, clients.num_classes)
    trainers, _, _ = build_trainers(config.model, own)
    return cid, trainers[cid]


def import_trainer(spec: str, client_id: str) -> Trainer:
    """Call `module:function` with `client_id` and return the trainer it builds."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError("--trainer", "trainer", f"expected module:function, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--trainer", "trainer", f"cannot load {spec!r}: {exc}") from exc
    trainer = factory(client_id)
    if not isinstance(trainer, Trainer):
        raise ConfigError("--trainer", "trainer", f"{spec} returned {type(trainer).__name__}")
    return trainer


def participate(
    server: str, client_id: str, trainer: Trainer, *, certs: Path, retry_for: float | None
) -> int:
    """Run a participant until the server says goodbye; returns the exit status (0), or 1
    with a message on stderr when the server refused us or could not be reached."""
    from fedloom.runtime.participant import ParticipantError, run_participant

    cert, key = PkiFiles.in_folder(certs).client_files(client_id)
    files = PkiFiles.in_folder(certs)
    try:
        done = run_participant(
            server,
            client_id,
            trainer,
            root_cert=_read(files.ca, "CA certificate"),
            cert_chain=_read(cert, f"certificate of client {client_id}"),
            private_key=_read(key, f"key of client {client_id}"),
            retry_for=retry_for,
        )
    except ParticipantError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 1
    print(f"fedloom client {client_id}: done, {done} task(s) run", flush=True)
    return 0
