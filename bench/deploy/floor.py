"""The two floors a round is compared with.

Loopback floor (`loopback`): the time to move one round's bytes between processes over
127.0.0.1, with nothing else to do. A listening socket in the driver, `clients` receiver
processes connecting out to it (like the federation's clients). A round: the driver sends
`down` bytes to every receiver at once (one thread per connection, `sendall` of one
preallocated buffer); each receiver reads exactly `down` bytes (`recv_into` a preallocated
buffer), then sends `up` bytes back; the round ends when the driver has read every receiver's
`up` bytes. Plain TCP, or TLS 1.3 with mutual authentication using the same test certificates
(Python's `ssl`: OpenSSL, AES-GCM). No framing, no serialization, no copies beyond the kernel's:
an optimistic floor.

Compute floor (`compute`): a plain PyTorch loop in one process, one thread, no federation
library: for every client, copy the global weights into one CNN, one SGD step on the client's
`batch` examples, add the new weights to a running sum; then the average. Its round time is the
single-core compute of a round; half of it is the best two cores could do.

Child entry points:

    python bench/deploy/floor.py receiver HOST:PORT DOWN UP ROUNDS WARMUP [CERTS K]
    python bench/deploy/floor.py compute PREP ROUNDS OUT.json
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST, Processes, client_id

HERE = Path(__file__).resolve()


def _recv_exactly(sock: socket.socket, buf: memoryview) -> None:
    """Fill `buf` from `sock` (raise if the peer closes first)."""
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-payload")
        got += n


def _client_context(certs: Path, k: int) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    cid = client_id(k)
    ctx.load_cert_chain(certs / "clients" / f"{cid}.pem", certs / "clients" / f"{cid}.key")
    return ctx


def _server_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def receiver_main(
    address: str, down: int, up: int, rounds: int, warmup: int, certs: Path | None, k: int
) -> None:
    """One receiver process: per round, read `down` bytes, send `up` bytes; at the end print
    the CPU seconds it used after the first `warmup` rounds."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if certs is not None:
        sock = _client_context(certs, k).wrap_socket(sock, server_hostname=host)
    inbox = memoryview(bytearray(down))
    payload = bytes(up)
    cpu = time.process_time()
    for r in range(rounds):
        if r == warmup:
            cpu = time.process_time()
        _recv_exactly(sock, inbox)
        sock.sendall(payload)
    print(f"CPU {time.process_time() - cpu:.6f}", flush=True)
    sock.close()


def loopback(
    clients: int, down: int, up: int, rounds: int, warmup: int, work: Path, certs: Path | None
) -> dict[str, Any]:
    """The loopback floor; TLS when `certs` is given. Returns `round_seconds` (every round,
    warm-up included) and `cpu_per_round`: CPU seconds of the driver and all receivers
    together per round after the warm-up."""
    listener = socket.create_server((HOST, 0), backlog=clients)
    port = listener.getsockname()[1]
    name = "loopback-tls" if certs is not None else "loopback-tcp"
    conns: list[socket.socket] = []
    times: list[float] = []
    try:
        with Processes(work / f"logs-{name}") as procs:
            for k in range(clients):
                tail = [str(certs), str(k)] if certs is not None else []
                argv = [sys.executable, str(HERE), "receiver", f"{HOST}:{port}", str(down),
                        str(up), str(rounds), str(warmup), *tail]  # fmt: skip
                procs.start(f"receiver-{k:02d}", argv)
            listener.settimeout(60.0)
            ctx = _server_context(certs) if certs is not None else None
            for _ in range(clients):
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns.append(ctx.wrap_socket(conn, server_side=True) if ctx else conn)
            payload = bytes(down)
            inboxes = [memoryview(bytearray(up)) for _ in conns]

            def exchange(i: int) -> None:
                conns[i].sendall(payload)
                _recv_exactly(conns[i], inboxes[i])

            with ThreadPoolExecutor(max_workers=clients) as pool:
                cpu = time.process_time()
                for r in range(rounds):
                    if r == warmup:
                        cpu = time.process_time()
                    start = time.perf_counter()
                    list(pool.map(exchange, range(clients)))
                    times.append(time.perf_counter() - start)
                cpu = time.process_time() - cpu
            for child in procs.children:
                child.wait(timeout=30.0)
    finally:
        for c in conns:
            c.close()
        listener.close()
    logs = work / f"logs-{name}"
    for k in range(clients):
        text = (logs / f"receiver-{k:02d}.log").read_text()
        cpu += float(text.split("CPU ")[-1].split()[0])
    return {"round_seconds": times, "cpu_per_round": cpu / max(rounds - warmup, 1)}


def compute_main(prep: Path, rounds: int, out: Path) -> None:
    """The plain PyTorch compute floor (one process, one thread); writes seconds per round."""
    import numpy as np
    import torch
    from torch.nn import functional as F
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from fedloom.models import mnist_cnn

    torch.set_num_threads(1)
    w = json.loads((prep / "workload.json").read_text())
    model = mnist_cnn()
    with np.load(prep / "initial.npz") as z:
        model.load_state_dict({k: torch.from_numpy(z[k].copy()) for k in z.files})
    params = list(model.parameters())
    shards = [
        (torch.from_numpy(np.load(prep / f"shard_{k}_x.npy")),
         torch.from_numpy(np.load(prep / f"shard_{k}_y.npy")))
        for k in range(w["clients"])
    ]  # fmt: skip
    global_vec = parameters_to_vector(params).detach().clone()
    times: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        total = torch.zeros_like(global_vec)
        for x, y in shards:
            vector_to_parameters(global_vec, params)
            for p in params:
                p.grad = None
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                for p in params:
                    assert p.grad is not None
                    p.sub_(p.grad, alpha=w["lr"])
                total += parameters_to_vector(params)
        global_vec = total / len(shards)
        times.append(time.perf_counter() - start)
    out.write_text(json.dumps({"round_seconds": times}))


def compute(prep: Path, rounds: int, work: Path, timeout: float) -> list[float]:
    """Seconds per round (warm-up included) of the compute floor, run in its own process."""
    out = work / "compute.json"
    out.unlink(missing_ok=True)
    with Processes(work / "logs-compute") as procs:
        child = procs.start(
            "compute", [sys.executable, str(HERE), "compute", str(prep), str(rounds), str(out)]
        )
        if child.wait(timeout=timeout) != 0:
            raise RuntimeError(f"compute floor failed (see {procs.logs}/compute.log)")
    result: dict[str, Any] = json.loads(out.read_text())
    return list(result["round_seconds"])


def main(argv: list[str]) -> None:
    """Child entry points (see the module docstring)."""
    if argv[0] == "receiver":
        certs = Path(argv[6]) if len(argv) > 6 else None
        k = int(argv[7]) if len(argv) > 7 else 0
        receiver_main(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), certs, k)
    elif argv[0] == "compute":
        compute_main(Path(argv[1]), int(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown role {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
