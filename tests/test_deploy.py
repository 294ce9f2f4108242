"""`fedloom certs | server | client`, and SCAFFOLD's client state over gRPC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from participants import participants
from toy import federation_of, initial

import fedloom
from fedloom.algorithms import Scaffold
from fedloom.certs import PkiFiles, write_test_pki
from fedloom.cli import main
from fedloom.runtime.enrolment import common_name
from fedloom.runtime.federation import Federation, Settings
from fedloom.runtime.remote import GrpcTransport

SRC = Path(fedloom.__file__).resolve().parents[1]


def test_certs_command_writes_a_ca_and_certificates_it_signed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["certs", str(tmp_path / "pki"), "--clients", "a,b"]) == 0
    files = PkiFiles.in_folder(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    # enrolling another client later keeps the CA (and the certificates it already signed)
    assert main(["certs", str(tmp_path / "pki"), "--clients", "c"]) == 0
    assert files.ca.read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    clients = {
        cid: x509.load_pem_x509_certificate(files.client_files(cid)[0].read_bytes())
        for cid in "abc"
    }
    for cert in (server, *clients.values()):
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
    assert {cid: common_name(cert) for cid, cert in clients.items()} == {c: c for c in "abc"}
    assert files.client_files("c")[1].stat().st_mode & 0o777 == 0o600
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert files.server_key.stat().st_mode & 0o777 == 0o600
    assert "wrote" in capsys.readouterr().out


def test_scaffold_over_grpc_equals_the_simulation(tmp_path: Path) -> None:
    """Each participant keeps its own control variate c_i across rounds."""
    pki = write_test_pki(tmp_path)  # server-only TLS: ids are not bound to certificates
    settings = Settings(rounds=3, fraction_fit=1.0, fraction_evaluate=1.0, learning_rate=0.05)
    with (
        GrpcTransport(
            server_cert=pki.server_cert.read_bytes(), server_key=pki.server_key.read_bytes()
        ) as transport,
        participants(transport.address, federation_of(3), pki, mutual=False),
    ):
        ids = transport.wait_for_clients(3, timeout=10)
        remote = Federation(Scaffold(num_clients=3), transport, ids, settings).run(initial())
    local = Federation.simulation(Scaffold(num_clients=3), federation_of(3), settings)
    simulated = local.run(initial())
    np.testing.assert_allclose(remote.state.params.flat, simulated.state.params.flat, atol=1e-6)
    np.testing.assert_allclose(
        remote.state.slots["control"].flat, simulated.state.slots["control"].flat, atol=1e-6
    )


def test_server_and_client_commands_run_a_federation(tmp_path: Path) -> None:
    write_test_pki(tmp_path / "certs", clients=["client-0", "client-1"])
    config = tmp_path / "run.toml"
    config.write_text(
        '[data]\ndataset = "breast_cancer"\nnum_clients = 2\n'
        "[federation]\nrounds = 3\nfraction_fit = 1.0\nmin_fit_clients = 2\nlearning_rate = 0.1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    fedloom_cmd = [sys.executable, "-m", "fedloom"]
    server = subprocess.Popen(
        [*fedloom_cmd, "server", "--config", str(config), "--address", "127.0.0.1:0",
         "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "runs.sqlite"),
         "--quiet", "--wait", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert "listening on 127.0.0.1:" in first, server.stderr.read() if server.stderr else ""
        address = first.rsplit(" ", 1)[-1].strip()
        clients = [
            subprocess.Popen(
                [*fedloom_cmd, "client", "--server", address, "--certs", str(tmp_path / "certs"),
                 "--config", str(config), "--partition", str(k)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for k in range(2)
        ]  # fmt: skip
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        assert "2 clients connected: client-0, client-1" in out
        assert "3 rounds" in out and "test accuracy" in out
        for proc in clients:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert "done, 3 task(s) run" in out
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
