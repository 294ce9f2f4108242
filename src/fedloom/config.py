"""Run configuration: TOML in, typed and validated dataclasses out, before any work starts.

Every problem is reported as `ConfigError` naming the file, the key and why: an unknown key, a
value of the wrong type, or an impossible value (fraction > 1, more clients per round than
clients, ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedloom.runtime.settings import Settings

DatasetName = Literal[
    "breast_cancer", "digits", "wine", "mnist", "fashion_mnist", "femnist", "shakespeare"
]
PartitionName = Literal["iid", "dirichlet", "shards", "quantity", "natural"]
ModelName = Literal["logistic", "mlp", "cnn", "lstm", "sklearn_sgd"]
StrategyName = Literal[
    "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"
]


class ConfigError(ValueError):
    """A configuration problem, located: `source` (file), `key` (dotted) and `why`."""

    def __init__(self, source: str, key: str, why: str) -> None:
        super().__init__(f"{source}: {key}: {why}")
        self.source, self.key, self.why = source, key, why


@dataclass(frozen=True)
class DataConfig:
    """Which data, split over how many clients, how."""

    dataset: DatasetName = "breast_cancer"
    partition: PartitionName = "dirichlet"
    num_clients: int = 8
    alpha: float = 0.5
    shards_per_client: int = 2
    client_test_fraction: float = 0.2
    max_clients: int | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The model every client trains."""

    kind: ModelName = "logistic"
    hidden: list[int] = field(default_factory=list)
    l2: float = 0.0


@dataclass(frozen=True)
class StrategyConfig:
    """The server algorithm and its hyperparameters (each used only by the algorithms named)."""

    name: StrategyName = "fedavg"
    server_lr: float | None = (
        None  # default: 1.0 (fedavg, fedavgm, fedprox, scaffold), 0.01 adaptive
    )
    momentum: float = 0.9  # fedavgm
    mu: float = 0.01  # fedprox
    beta1: float = 0.9  # fedadam, fedyogi, fedadagrad
    beta2: float = 0.99  # fedadam, fedyogi
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad


@dataclass(frozen=True)
class RuntimeConfig:
    """Where clients run: in this process, in worker processes (0 workers = every core), or in
    Ray actors on a Ray cluster (`address`: None starts a local Ray, "auto", "HOST:PORT" or
    "ray://HOST:PORT" join a running one; 0 actors = one per cluster CPU)."""

    kind: Literal["inprocess", "processes", "ray"] = "inprocess"
    workers: int = 0
    address: str | None = None
    actors: int = 0


@dataclass(frozen=True)
class StoreConfig:
    """Where runs are recorded: one SQLite file, checkpoints in a folder beside it."""

    path: str = ".fedloom/runs.sqlite"


@dataclass(frozen=True)
class RunConfig:
    """A whole run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: Settings = field(default_factory=Settings)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML-able except None values, which are dropped)."""
        plain: dict[str, Any] = _drop_none(dataclasses.asdict(self))
        return plain


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML file. Raises `ConfigError` (never a bare KeyError/TypeError)."""
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(source, "(file)", "no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", str(exc)) from exc
    return parse_config(raw, source)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a nested dict (as TOML parses it) into a `RunConfig`."""
    config: RunConfig = _build(RunConfig, raw, source, "")
    _cross_checks(config, source)
    return config


def _build(cls: type[Any], raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "(top level)"
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(
            source, prefix + unknown[0], f"unknown key (known: {', '.join(sorted(fields))})"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(typing.cast(type[Any], hint), value, source, key + ".")
        else:
            values[name] = _check_type(hint, value, source, key)
    try:
        return cls(**values)
    except ValueError as exc:
        # Settings validates itself: "<field> = <value>: <why>"
        field_name, _, why = str(exc).partition(" = ")
        key = prefix + field_name if field_name in fields else where
        raise ConfigError(
            source, key, str(exc) if key == where else why.split(": ", 1)[-1]
        ) from exc


def _check_type(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                source, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_type(args[0], value, source, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {type(value).__name__}")
        return [_check_type(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(source, key, f"expected {expected}, got {type(value).__name__} {value!r}")


def _cross_checks(config: RunConfig, source: str) -> None:
    data, fed = config.data, config.federation
    if data.num_clients < 1:
        raise ConfigError(source, "data.num_clients", "must be at least 1")
    if fed.min_fit_clients > data.num_clients:
        raise ConfigError(
            source,
            "federation.min_fit_clients",
            f"{fed.min_fit_clients} exceeds data.num_clients = {data.num_clients}",
        )
    if not 0.0 <= data.client_test_fraction < 1.0:
        raise ConfigError(source, "data.client_test_fraction", "must be in [0, 1)")
    if data.alpha <= 0:
        raise ConfigError(source, "data.alpha", "must be > 0")
    if data.shards_per_client < 1:
        raise ConfigError(source, "data.shards_per_client", "must be at least 1")
    if config.runtime.workers < 0:
        raise ConfigError(source, "runtime.workers", "must be >= 0 (0 means every core)")
    _check_ray(config.runtime, source)
    if data.partition == "natural" and data.dataset not in ("femnist", "shakespeare"):
        raise ConfigError(
            source, "data.partition", f"'natural' needs a dataset with owners, not {data.dataset!r}"
        )
    if any(h < 1 for h in config.model.hidden):
        raise ConfigError(source, "model.hidden", "layer sizes must be at least 1")


def _check_ray(runtime: RuntimeConfig, source: str) -> None:
    """`address` and `actors` belong to kind = "ray"; an address must look like one."""
    if runtime.kind != "ray":
        for key, value, unset in (
            ("address", runtime.address, None),
            ("actors", runtime.actors, 0),
        ):
            if value != unset:
                raise ConfigError(source, f"runtime.{key}", 'only used with kind = "ray"')
        return
    if runtime.actors < 0:
        raise ConfigError(source, "runtime.actors", "must be >= 0 (0 means one per cluster CPU)")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(source, "runtime.kind", "\"ray\" needs Ray: pip install 'fedloom[ray]'")
    address = runtime.address
    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or any(
        c.isspace() or c in "/@?#" for c in host
    ):
        raise ConfigError(
            source,
            "runtime.address",
            f'{address!r} is not "auto", "HOST:PORT" or "ray://HOST:PORT"',
        )
