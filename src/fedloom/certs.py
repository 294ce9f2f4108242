"""Test certificates for TLS deployments: a CA, and server and client certificates it signs.

`write_test_pki(folder)` writes, as PEM files::

    ca.pem, ca.key          a self-signed certificate authority (keep ca.key private)
    server.pem, server.key  the server's certificate, with SANs for the given hosts
                            (default 127.0.0.1 and localhost)
    clients/<id>.pem, .key  one certificate per client, its common name the client id:
                            the server takes a client's identity from it (mutual TLS)

For tests and trials. In production use your organisation's CA; the keys here are EC P-256,
valid for `days` days, and written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
#: The longest client id (also the protocol's limit).
MAX_CLIENT_ID = 256


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, PEM-encoded (PKCS#8, unencrypted)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedloom test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: str, issuer: x509.Name, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(common_name: str = "fedloom test CA", days: int = 365) -> Issued:
    """A new self-signed certificate authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = True,
    days: int = 365,
) -> Issued:
    """A certificate for `common_name` signed by `ca`: a server certificate naming `hosts`
    (IP addresses or DNS names) in its SAN, or a client certificate (`server=False`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.cert.subject, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def check_client_id(client_id: str) -> str:
    """`client_id` if it can name a client (and its certificate files), else `ValueError`."""
    if (
        not client_id
        or len(client_id) > MAX_CLIENT_ID
        or not client_id.isprintable()
        or any(c in client_id for c in "/\\")
        or client_id.startswith(".")
    ):
        raise ValueError(
            f"client id {client_id!r} must be 1 to {MAX_CLIENT_ID} printable characters, "
            "without '/' or '\\', not starting with '.'"
        )
    return client_id


@dataclass(frozen=True)
class PkiFiles:
    """Where a PKI folder keeps its files (whether or not they exist yet)::

    ca.pem, ca.key                  the certificate authority
    server.pem, server.key          the server
    clients/<id>.pem, <id>.key      one certificate per client, common name = the client id
    """

    folder: Path

    @classmethod
    def in_folder(cls, folder: str | Path) -> PkiFiles:
        """The files of the PKI folder `folder`."""
        return cls(Path(folder))

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def client_files(self, client_id: str) -> tuple[Path, Path]:
        """(certificate, key) paths of client `client_id`."""
        base = self.folder / "clients" / check_client_id(client_id)
        return base.with_name(base.name + ".pem"), base.with_name(base.name + ".key")


def _write(issued: Issued, cert_path: Path, key_path: Path) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(issued.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(issued.key_pem)


def write_test_pki(
    folder: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = (),
    days: int = 365,
) -> PkiFiles:
    """Create a CA, a server certificate for `hosts` and one client certificate per id in
    `clients`; write them as PEM files into `folder` (created if needed; existing files are
    overwritten). More clients can be enrolled later with `enrol_clients`."""
    files = PkiFiles.in_folder(folder)
    ca = make_ca(days=days)
    server = issue(ca, hosts[0] if hosts else "fedloom server", hosts=hosts, days=days)
    _write(ca, files.ca, files.ca_key)
    _write(server, files.server_cert, files.server_key)
    enrol_clients(files, clients, days=days)
    return files


def enrol_clients(files: PkiFiles, clients: Sequence[str], *, days: int = 365) -> list[Path]:
    """Issue a client certificate (common name = the id) for each of `clients` with the CA in
    `files` (its `ca.key` must be there); returns the certificate paths written."""
    ids = [check_client_id(cid) for cid in clients]
    if not ids:
        return []
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.ca_key}: expected an EC private key")
    ca = Issued(ca_cert, ca_key)
    written = []
    for cid in ids:
        cert_path, key_path = files.client_files(cid)
        _write(issue(ca, cid, server=False, days=days), cert_path, key_path)
        written.append(cert_path)
    return written
