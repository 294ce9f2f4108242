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
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fedloom.certs import PkiFiles
from fedloom.config import ConfigError, RunConfig
from fedloom.core.trainer import Trainer

if TYPE_CHECKING:
    from fedloom.runtime.remote import GrpcTransport


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "(certs)", f"cannot read the {what}: {exc.strerror}") from exc


def serve(
    config: RunConfig,
    store_path: Path,
    *,
    address: str,
    certs: Path,
    clients: int,
    wait: float,
    timeout: float,
    allow: Path | None = None,
    revoked: Path | None = None,
    quiet: bool = False,
) -> int:
    """Listen on `address`, wait up to `wait` seconds for `clients` clients, then run `config`
    over them (rounds, strategy, evaluation; recorded in `store_path`). `allow` and `revoked`
    are the enrolment files (`Enrolment.from_files`), watched for changes while it runs.
    Returns the exit status: 0 when the run finished, 1 if too few clients came, 2 if it
    cannot listen."""
    import sys

    from fedloom.experiment import run_experiment
    from fedloom.runtime.enrolment import Enrolment, EnrolmentError
    from fedloom.runtime.remote import GrpcTransport

    files = PkiFiles.in_folder(certs)
    try:
        enrolment = Enrolment.from_files(allow, revoked)
    except EnrolmentError as exc:
        raise ConfigError(str(exc).split(":", 1)[0], "(enrolment)", str(exc)) from exc
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
    ids = transport.wait_for_clients(clients, wait)
    if len(ids) < clients:
        transport.close("the server gave up waiting for clients")
        print(f"fedloom server: {len(ids)} of {clients} clients connected after {wait:g} s")
        return 1
    print(f"fedloom server: {len(ids)} clients connected: {', '.join(ids)}", flush=True)
    return run_experiment(config, store_path, quiet=quiet, transport=transport, client_ids=ids)


def watch_enrolment(
    transport: GrpcTransport, allow: Path | None, revoked: Path | None, every: float = 1.0
) -> threading.Thread:
    """Re-read the enrolment files whenever one changes (checked every `every` seconds) and
    apply them to `transport` (revoked clients lose their sessions at once). A file that has
    become unreadable or malformed keeps the previous policy, with a message on stderr."""
    import sys

    from fedloom.runtime.enrolment import Enrolment, EnrolmentError

    paths = [p for p in (allow, revoked) if p is not None]

    def stamps() -> list[float]:
        return [p.stat().st_mtime if p.exists() else -1.0 for p in paths]

    def loop() -> None:
        seen = stamps()
        while not transport.closed.wait(every):
            now = stamps()
            if now == seen:
                continue
            seen = now
            try:
                transport.set_enrolment(Enrolment.from_files(allow, revoked))
                print("fedloom server: enrolment files re-read", flush=True)
            except EnrolmentError as exc:
                print(f"fedloom server: enrolment unchanged: {exc}", file=sys.stderr, flush=True)

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
    import sys

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
