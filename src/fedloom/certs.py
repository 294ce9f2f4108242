"""Test certificates for TLS deployments: a CA, and server and client certificates it signs.

`write_test_pki(folder)` writes, as PEM files::

    ca.pem, ca.key          a self-signed certificate authority (keep ca.key private)
    server.pem, server.key  the server's certificate, with SANs for the given hosts
                            (default 127.0.0.1 and localhost)
    client.pem, client.key  a client certificate, for servers that require mutual TLS

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


@dataclass(frozen=True)
class PkiFiles:
    """Paths of the files `write_test_pki` wrote."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_folder(cls, folder: str | Path) -> PkiFiles:
        """The standard file names inside `folder` (whether or not they exist)."""
        d = Path(folder)
        return cls(
            d / "ca.pem",
            d / "ca.key",
            d / "server.pem",
            d / "server.key",
            d / "client.pem",
            d / "client.key",
        )


def write_test_pki(
    folder: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    client_name: str = "fedloom client",
    days: int = 365,
) -> PkiFiles:
    """Create a CA, a server certificate for `hosts` and a client certificate; write them as
    PEM files into `folder` (created if needed; existing files are overwritten)."""
    files = PkiFiles.in_folder(folder)
    files.ca.parent.mkdir(parents=True, exist_ok=True)
    ca = make_ca(days=days)
    server = issue(ca, hosts[0] if hosts else "fedloom server", hosts=hosts, days=days)
    client = issue(ca, client_name, server=False, days=days)
    for issued, cert_path, key_path in (
        (ca, files.ca, files.ca_key),
        (server, files.server_cert, files.server_key),
        (client, files.client_cert, files.client_key),
    ):
        cert_path.write_bytes(issued.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(issued.key_pem)
    return files
