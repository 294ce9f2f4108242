"""Who may join a deployed federation, and proof that an update comes from its client.

Identity comes from the client's TLS certificate (mutual TLS): its common name IS the client
id. A client whose hello names another id is refused. An `Enrolment` narrows that further: an
allow-list of ids (None: every id the CA certified) and a revocation list of ids and of
certificate fingerprints (SHA-256 of the DER certificate, hex), for a client whose key leaked
before its certificate expired.

Every reply is signed with the client's certificate key over the task's nonce and the reply
frame's BLAKE3 digest (`reply_message`; BLAKE3 hashes about 3x faster than SHA-256 here, and
both ends hash every update), so the server can check that the update was produced for
THIS task (not replayed from an old round) by THIS client (not signed with another one's key).
EC (ECDSA with SHA-256), RSA (PSS with SHA-256) and Ed25519 keys are supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

_CONTEXT = b"fedloom reply v2 blake3\x00"
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class EnrolmentError(ValueError):
    """An allow-list or revocation file cannot be read; the message names the file and line."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex (what revocation lists use)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate) -> str | None:
    """The certificate's subject common name, or None if it has none."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


@dataclass(frozen=True)
class Enrolment:
    """The server's admission policy for certified clients."""

    allowed: frozenset[str] | None = None
    revoked_ids: frozenset[str] = frozenset()
    revoked_fingerprints: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, allow: Path | None = None, revoked: Path | None = None) -> Enrolment:
        """Read an allow-list (one client id per line) and a revocation list (one client id or
        certificate fingerprint per line; fingerprints may contain ':'); '#' starts a comment.
        Raises `EnrolmentError` naming the file when it cannot be read or is malformed."""
        ids = _lines(allow) if allow is not None else None
        revoked_ids: set[str] = set()
        prints: set[str] = set()
        for entry in _lines(revoked) if revoked is not None else []:
            hexed = entry.replace(":", "").lower()
            if len(hexed) == 64 and all(c in "0123456789abcdef" for c in hexed):
                prints.add(hexed)
            else:
                revoked_ids.add(entry)
        return cls(
            frozenset(ids) if ids is not None else None, frozenset(revoked_ids), frozenset(prints)
        )

    def refusal(self, client_id: str, cert: x509.Certificate | None) -> str | None:
        """Why `client_id` (presenting `cert`, None without mutual TLS) may not join, or None."""
        if cert is not None:
            name = common_name(cert)
            if name != client_id:
                return (
                    f"the certificate was issued to {name!r} but the client says it is "
                    f"{client_id!r}; a client's id is its certificate's common name"
                )
            if fingerprint(cert) in self.revoked_fingerprints:
                return f"the certificate of client {client_id!r} has been revoked"
        if client_id in self.revoked_ids:
            return f"client {client_id!r} has been revoked"
        if self.allowed is not None and client_id not in self.allowed:
            return f"client {client_id!r} is not enrolled (not on this server's allow-list)"
        return None


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrolmentError(f"{path}: cannot read the list: {exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not entry.isprintable() or " " in entry:
            raise EnrolmentError(f"{path}:{number}: {entry!r} is not one client id or fingerprint")
        entries.append(entry)
    return entries


# -- signed replies -----------------------------------------------------------------------------
def reply_message(nonce: bytes, digest: bytes) -> bytes:
    """What a client signs for a reply: a context string, the task's nonce and the reply
    frame's digest (`frame_digest`)."""
    return _CONTEXT + nonce + digest


def reply_hasher() -> blake3.blake3:
    """A fresh hasher for reply frames (BLAKE3, 32-byte digests): feed it with `update`."""
    return blake3.blake3()


def frame_digest(frame: bytes | Sequence[bytes | memoryview]) -> bytes:
    """The digest of a frame, or of the concatenation of its pieces (what `reply_message`
    takes)."""
    hasher = reply_hasher()
    for piece in [frame] if isinstance(frame, bytes) else frame:
        hasher.update(piece)
    return hasher.digest()


def load_private_key(pem: bytes) -> Signer:
    """A signer for PEM private key bytes; `ValueError` for an unsupported key type."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, _PrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return Signer(key)


@dataclass(frozen=True)
class Signer:
    """Signs reply messages with a client's certificate key."""

    key: _PrivateKey

    def sign(self, message: bytes) -> bytes:
        """The signature of `message` (see `verify`)."""
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(message, _pss(), hashes.SHA256())
        return self.key.sign(message)


def verify(cert: x509.Certificate, signature: bytes, message: bytes) -> bool:
    """Whether `signature` over `message` was made with the key of `cert`."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, _pss(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
