"""RayTransport on a real two-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`: a
head node and a worker node, each its own raylet and object store, one CPU each).

The trainers come from `toy` (tests/runtime), which the Ray workers import by the PYTHONPATH
the nodes are started with. Ray rewrites a 127.0.0.1 address to the machine's routable IP
(where nothing listens, as the nodes bind 127.0.0.1 only) unless its "no real cluster" switch
is off; the fixture turns it off for this process and the nodes it starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from toy import Toy, federation_of

from fedloom.algorithms import FedAvg, Scaffold
from fedloom.config import ConfigError, parse_config
from fedloom.core.params import Params
from fedloom.core.types import FitConfig, Update
from fedloom.experiment import (
    build_strategy,
    build_trainers,
    build_transport,
    load_clients,
    standardize,
)
from fedloom.runtime.client import ClientPool
from fedloom.runtime.federation import Federation, RunResult, Settings
from fedloom.runtime.ray_transport import RayTransport
from fedloom.runtime.transport import InProcessTransport, Transport


class Crasher(Toy):
    """Kills the process it runs in (its Ray actor)."""

    def fit(self, params: Params, config: FitConfig) -> Update:
        os._exit(9)


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    here = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, old) if p)
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # keep 127.0.0.1 as is
    was_enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(shutdown_at_exit=True)
    try:
        common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
        cluster.add_node(**common)
        cluster.add_node(**{k: v for k, v in common.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = was_enabled
        os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def run(
    transport: Transport, trainers: dict[str, Toy], strategy: object, settings: Settings
) -> RunResult:
    try:
        first = next(iter(trainers.values()))
        return Federation(strategy, transport, list(trainers), settings).run(  # type: ignore[arg-type]
            first.initial_params()
        )
    finally:
        transport.close()


def test_two_node_cluster_gives_bit_identical_results(cluster_address: str) -> None:
    settings = Settings(rounds=3, fraction_fit=0.5, fraction_evaluate=0.3, learning_rate=0.05)
    for strategy in (FedAvg(), Scaffold(num_clients=12)):
        a = run(
            InProcessTransport(ClientPool(federation_of(12))), federation_of(12), strategy, settings
        )
        transport = RayTransport(federation_of(12), address=cluster_address, actors=2)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        b = run(transport, federation_of(12), strategy, settings)
        assert not ray.is_initialized()  # it connected, so it disconnected
        assert np.array_equal(a.state.params.flat, b.state.params.flat)
        assert a.state.params.flat.tobytes() == b.state.params.flat.tobytes()
        assert [r.metrics for r in a.history] == [r.metrics for r in b.history]
        for name, slot in a.state.slots.items():
            assert slot.flat.tobytes() == b.state.slots[name].flat.tobytes()


def test_a_factory_builds_the_clients_on_the_actors(cluster_address: str) -> None:
    settings = Settings(rounds=2, fraction_fit=0.5, learning_rate=0.05)
    a = run(InProcessTransport(ClientPool(federation_of(8))), federation_of(8), FedAvg(), settings)
    transport = RayTransport(lambda: federation_of(8), address=cluster_address, actors=2)
    b = run(transport, federation_of(8), FedAvg(), settings)
    assert a.state.params.flat.tobytes() == b.state.params.flat.tobytes()


def test_failing_clients_are_rejections_not_crashes(cluster_address: str) -> None:
    trainers = federation_of(6, modes={1: "raise"})
    trainers["c00"] = Crasher(np.zeros(4), 10)
    transport = RayTransport(trainers, address=cluster_address, actors=2)
    settings = Settings(rounds=2, fraction_fit=1.0, min_fit_clients=2, fraction_evaluate=0.0)
    result = run(transport, trainers, FedAvg(), settings)
    reasons = [r.reason for rec in result.history for r in rec.rejections]
    assert any("Ray actor died" in r for r in reasons), reasons
    assert any("disk on fire" in r for r in reasons), reasons
    assert all(rec.num_accepted >= 2 for rec in result.history)


def test_config_kind_ray_runs_digits_bit_identically(cluster_address: str) -> None:
    """`[runtime] kind = "ray"` through `build_transport`: softmax regression on digits."""
    raw = {
        "data": {"dataset": "digits", "num_clients": 6, "partition": "iid"},
        "strategy": {"name": "scaffold"},
        "federation": {"rounds": 2, "fraction_fit": 0.5, "learning_rate": 0.1},
        "runtime": {"kind": "ray", "address": cluster_address, "actors": 2},
    }
    config = parse_config(raw)
    clients = standardize(load_clients(config.data, config.federation.seed))
    results = []
    for transport_of in (
        lambda t: build_transport(parse_config({**raw, "runtime": {}}), t),
        lambda t: build_transport(config, t),
    ):
        trainers, initial, _ = build_trainers(config.model, clients)
        transport = transport_of(trainers)
        try:
            strategy = build_strategy(config.strategy, len(trainers))
            federation = Federation(strategy, transport, list(trainers), config.federation)
            results.append(federation.run(initial))
        finally:
            transport.close()
    assert type(transport).__name__ == "RayTransport"
    a, b = results
    assert np.array_equal(a.state.params.flat, b.state.params.flat)
    assert [r.metrics for r in a.history] == [r.metrics for r in b.history]


@pytest.mark.parametrize(
    ("runtime", "key", "why"),
    [
        ({"kind": "ray", "address": "not an address"}, "runtime.address", "is not"),
        ({"kind": "ray", "address": "head:99999"}, "runtime.address", "is not"),
        ({"kind": "ray", "address": "http://head:6379"}, "runtime.address", "is not"),
        ({"kind": "ray", "address": 6379}, "runtime.address", "expected str"),
        ({"kind": "ray", "actors": -1}, "runtime.actors", ">= 0"),
        ({"kind": "ray", "actors": "2"}, "runtime.actors", "expected int"),
        ({"kind": "processes", "address": "head:6379"}, "runtime.address", 'kind = "ray"'),
        ({"kind": "inprocess", "actors": 2}, "runtime.actors", 'kind = "ray"'),
        ({"kind": "rey"}, "runtime.kind", "is not one of"),
    ],
)
def test_bad_ray_runtime_config_fails_naming_the_key(
    runtime: dict[str, object], key: str, why: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"runtime": runtime})
    assert caught.value.key == key and why in caught.value.why, caught.value


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "ray://head.example:10001"])
def test_good_ray_addresses_parse(address: str) -> None:
    config = parse_config({"runtime": {"kind": "ray", "address": address, "actors": 3}})
    assert config.runtime.address == address and config.runtime.actors == 3
