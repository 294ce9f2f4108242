"""Real MNIST over a real deployment: a `fedloom server` process and four `fedloom client
--config F --partition K` processes on 127.0.0.1, mutual TLS with the per-client certificates
`fedloom certs DIR --config F` writes, train to a target test accuracy."""

from __future__ import annotations

from pathlib import Path

from deploy_helpers import procs
from fedloom.cli import main
from fedloom.store import RunStore

#: Multinomial logistic regression on standardized pixels, 4 IID clients of 15,000 images:
#: 0.912, 0.917, 0.921 test accuracy after rounds 1-3 (fixed seeds: always these).
MNIST = """\
name = "mnist-over-grpc"
[data]
dataset = "mnist"
partition = "iid"
num_clients = 4
[model]
kind = "logistic"
[federation]
rounds = 3
fraction_fit = 1.0
min_fit_clients = 4
learning_rate = 0.05
batch_size = 32
"""


def test_four_client_processes_train_mnist_to_91_percent(tmp_path: Path) -> None:
    config = tmp_path / "mnist.toml"
    config.write_text(MNIST)
    certs, store = tmp_path / "certs", tmp_path / "runs.sqlite"
    assert main(["certs", str(certs), "--config", str(config)]) == 0  # client-0 ... client-3
    with procs() as group:
        server = group.start(
            "server", "--config", str(config), "--address", "127.0.0.1:0", "--certs",
            str(certs), "--store", str(store), "--quiet", "--wait", "120",
        )  # fmt: skip
        address = server.wait_for("listening on 127.0.0.1:", 60).rsplit(" ", 1)[-1].strip()
        common = ["--server", address, "--certs", str(certs), "--config", str(config)]
        clients = [group.start("client", *common, "--partition", str(k)) for k in range(4)]
        assert server.wait(120) == 0, server.stderr
        for proc in clients:
            assert proc.wait(30) == 0, proc.stderr
            assert "done, 3 task(s) run" in proc.stdout
    assert "4 clients connected: client-0, client-1, client-2, client-3" in server.stdout
    with RunStore(store) as runs:
        (run,) = runs.list_runs()
        records = runs.rounds(run.id)
    assert run.status == "finished"
    assert [(r.round, r.num_accepted, len(r.rejections)) for r in records] == [
        (1, 4, 0),
        (2, 4, 0),
        (3, 4, 0),
    ]
    accuracy = [r.metrics["accuracy"] for r in records]
    assert accuracy[-1] >= 0.91, accuracy
    assert f"test accuracy {accuracy[-1]:.4f}" in server.stdout
