"""`fedloom run | runs | show | certs | server | client`: the command line.

`fedloom run` with no argument runs the embedded default federation (hospitals sharing the
breast-cancer data that ships with scikit-learn), offline, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import resources
from pathlib import Path

from fedloom.config import ConfigError, RunConfig, load_config, parse_config
from fedloom.store import RunStore, RunStoreError

DEFAULT_CONFIG = "hospitals.toml"


def default_config_text() -> str:
    """The embedded default configuration, as TOML text."""
    return resources.files("fedloom").joinpath("defaults", DEFAULT_CONFIG).read_text("utf-8")


def _load(args: argparse.Namespace) -> RunConfig:
    if args.config is None:
        return parse_config(tomllib.loads(default_config_text()), f"<embedded {DEFAULT_CONFIG}>")
    return load_config(args.config)


def _store_path(args: argparse.Namespace, config: RunConfig | None = None) -> Path:
    if args.store is not None:
        return Path(args.store)
    return Path(config.store.path if config is not None else RunConfig().store.path)


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, build the federation, run it, print the table."""
    from fedloom.experiment import run_experiment  # heavy imports only when running

    store_path = _store_path(args)
    if args.resume is not None:
        with RunStore(store_path) as store:
            info = store.get_run(args.resume)
            config = parse_config(info.config, f"run {info.id} in {store_path}")
        if info.status == "finished":
            print(f"run {info.id} already finished; its model: {info.model_path}")
            return 0
        return run_experiment(config, store_path, resume=info.id, quiet=args.quiet)
    config = _load(args)
    if args.print_config:
        print(default_config_text() if args.config is None else Path(args.config).read_text())
        return 0
    return run_experiment(config, _store_path(args, config), quiet=args.quiet)


def cmd_runs(args: argparse.Namespace) -> int:
    """List the runs in the store."""
    from fedloom.report import runs_table

    path = _store_path(args)
    if not path.exists():
        print(f"no runs yet ({path} does not exist)")
        return 0
    with RunStore(path) as store:
        print(runs_table(store.list_runs()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print one run: its config summary, rounds and rejections."""
    from fedloom.report import rounds_table

    with RunStore(_store_path(args)) as store:
        info = store.get_run(args.run_id)
        print(f"run {info.id}  {info.name}  status {info.status}  created {info.created}")
        if info.message:
            print(f"message: {info.message}")
        if info.model_path:
            print(f"model: {info.model_path}")
        records = store.rounds(info.id)
        print(rounds_table(records) if records else "no rounds recorded")
        for round_number, rejection in store.rejections(info.id):
            print(f"rejected in round {round_number}: {rejection.client_id}: {rejection.reason}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a test CA and server/client certificates into a folder."""
    from fedloom.certs import PkiFiles, check_client_id, enrol_clients, write_test_pki

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    ids = [c.strip() for c in (args.clients or "").split(",") if c.strip()]
    if args.config is not None:
        from fedloom.experiment import prepared_clients

        ids += [cid for cid in prepared_clients(load_config(args.config)).parts if cid not in ids]
    for cid in ids:
        try:
            check_client_id(cid)
        except ValueError as exc:
            raise ConfigError("(arguments)", "--clients", str(exc)) from exc
    files = PkiFiles.in_folder(args.folder)
    if files.ca.exists() and files.ca_key.exists():
        written = enrol_clients(files, ids)
        print(f"enrolled {len(written)} client(s) with the existing CA {files.ca}")
        return 0
    write_test_pki(args.folder, hosts=hosts, clients=ids)
    print(
        f"wrote {files.ca}, {files.server_cert} and {len(ids)} client certificate(s) "
        f"in {files.folder / 'clients'}, with their keys"
    )
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Run a federation over gRPC with TLS for clients that connect to it."""
    from fedloom.deploy import serve

    config = None if args.resume is not None and args.config is None else _load(args)
    return serve(
        config,
        _store_path(args, config),
        address=args.address,
        certs=Path(args.certs),
        clients=args.clients,
        wait=args.wait,
        timeout=args.round_timeout,
        allow=Path(args.allow) if args.allow else None,
        revoked=Path(args.revoked) if args.revoked else None,
        quiet=args.quiet,
        resume=args.resume,
        fresh=args.fresh,
    )


def cmd_client(args: argparse.Namespace) -> int:
    """Connect to a server and train on the tasks it sends."""
    from fedloom.deploy import config_trainer, import_trainer, participate

    if (args.trainer is None) == (args.config is None):
        raise ConfigError("(arguments)", "--trainer/--config", "give exactly one of them")
    if args.trainer is not None:
        if args.client_id is None:
            raise ConfigError("(arguments)", "--client-id", "required with --trainer")
        client_id, trainer = args.client_id, import_trainer(args.trainer, args.client_id)
    else:
        if args.partition is None:
            raise ConfigError("(arguments)", "--partition", "required with --config")
        client_id, trainer = config_trainer(load_config(args.config), args.partition)
        client_id = args.client_id or client_id
    retry_for = None if args.retry_for < 0 else args.retry_for
    return participate(args.server, client_id, trainer, certs=Path(args.certs), retry_for=retry_for)


def _deploy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser(
        "certs", help="write a test CA, server and client certificates (or enrol more clients)"
    )
    certs.add_argument("folder")
    certs.add_argument(
        "--hosts", default="127.0.0.1,localhost", help="server SANs, comma-separated"
    )
    certs.add_argument("--clients", help="client ids to certify, comma-separated")
    certs.add_argument("--config", help="certify every client of this run configuration")
    certs.set_defaults(func=cmd_certs)
    server = sub.add_parser("server", help="run a federation over gRPC (TLS) for real clients")
    server.add_argument("--config", help="a TOML run configuration (default: the embedded one)")
    server.add_argument("--address", default="127.0.0.1:8443", help="host:port to listen on")
    server.add_argument("--certs", default="certs", help="folder with ca.pem, server.pem/.key")
    server.add_argument("--clients", type=int, help="clients to wait for (default: num_clients)")
    server.add_argument("--wait", type=float, default=300.0, help="seconds to wait for them")
    server.add_argument("--round-timeout", type=float, default=600.0, help="seconds per dispatch")
    server.add_argument("--store", help="run store file (default: the config's store.path)")
    server.add_argument("--allow", help="allow-list file: the client ids that may join")
    server.add_argument("--revoked", help="revoked client ids or certificate fingerprints")
    server.add_argument("--quiet", action="store_true", help="no progress bar")
    restart = server.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this run (default: the config's last run if it did not finish)",
    )
    restart.add_argument(
        "--fresh", action="store_true", help="start a new run even if the last one did not finish"
    )
    server.set_defaults(func=cmd_server)
    client = sub.add_parser("client", help="serve tasks from a fedloom server")
    client.add_argument("--server", required=True, help="host:port of the server")
    client.add_argument("--client-id", help="this client's id (default with --config: its name)")
    client.add_argument("--certs", default="certs", help="folder with ca.pem, clients/ID.pem/.key")
    client.add_argument("--trainer", help="module:function(client_id) -> Trainer")
    client.add_argument("--config", help="a TOML run configuration to build the trainer from")
    client.add_argument("--partition", type=int, help="with --config: which client (0-based)")
    client.add_argument(
        "--retry-for", type=float, default=60.0, help="seconds to keep retrying (<0: forever)"
    )
    client.set_defaults(func=cmd_client)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="fedloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federation (the embedded default with no CONFIG)")
    run.add_argument("config", nargs="?", help="a TOML run configuration")
    run.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run")
    run.add_argument("--store", help="run store file (default: the config's store.path)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--print-config", action="store_true", help="print the config and exit")
    run.set_defaults(func=cmd_run)
    runs = sub.add_parser("runs", help="list runs")
    runs.add_argument("--store", help="run store file")
    runs.set_defaults(func=cmd_runs)
    show = sub.add_parser("show", help="show one run")
    show.add_argument("run_id")
    show.add_argument("--store", help="run store file")
    show.set_defaults(func=cmd_show)
    _deploy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except (ConfigError, RunStoreError) as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfedloom: interrupted; resume with `fedloom run --resume RUN_ID`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
