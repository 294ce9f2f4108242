"""`fedloom server` and `fedloom client`: a federation over gRPC with TLS, from the command line.

The server runs a run config's strategy, rounds and evaluation over `GrpcTransport`; each
client is a separate process (on another machine, or behind NAT: clients connect out) running
`run_participant` with a trainer given as `module:function` or built from the same run config
(`--config FILE --partition K`: the K-th client of the config's data split, as simulation
builds it).

Certificates come from one folder (`fedloom certs DIR` writes a test set): the server reads
`ca.pem`, `server.pem`, `server.key` and requires clients to present a certificate signed by
`ca.pem` (mutual TLS); a client reads `ca.pem`, `client.pem`, `client.key`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fedloom.certs import PkiFiles
from fedloom.config import ConfigError, RunConfig
from fedloom.core.trainer import Trainer


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
    quiet: bool = False,
) -> int:
    """Listen on `address`, wait up to `wait` seconds for `clients` clients, then run `config`
    over them (rounds, strategy, evaluation; recorded in `store_path`). Returns the exit
    status: 0 when the run finished, 1 if too few clients came, 2 if it cannot listen."""
    import sys

    from fedloom.experiment import run_experiment
    from fedloom.runtime.remote import GrpcTransport

    files = PkiFiles.in_folder(certs)
    try:
        transport = GrpcTransport(
            address,
            server_cert=_read(files.server_cert, "server certificate"),
            server_key=_read(files.server_key, "server key"),
            client_ca=_read(files.ca, "CA certificate"),
            timeout=timeout,
        )
    except OSError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 2
    print(f"fedloom server: listening on {transport.address}", flush=True)
    ids = transport.wait_for_clients(clients, wait)
    if len(ids) < clients:
        transport.close("the server gave up waiting for clients")
        print(f"fedloom server: {len(ids)} of {clients} clients connected after {wait:g} s")
        return 1
    print(f"fedloom server: {len(ids)} clients connected: {', '.join(ids)}", flush=True)
    return run_experiment(config, store_path, quiet=quiet, transport=transport, client_ids=ids)


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

    files = PkiFiles.in_folder(certs)
    try:
        done = run_participant(
            server,
            client_id,
            trainer,
            root_cert=_read(files.ca, "CA certificate"),
            cert_chain=_read(files.client_cert, "client certificate"),
            private_key=_read(files.client_key, "client key"),
            retry_for=retry_for,
        )
    except ParticipantError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 1
    print(f"fedloom client {client_id}: done, {done} task(s) run", flush=True)
    return 0
