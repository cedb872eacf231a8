"""Loading a node's (or operator's) identity directory: certificate, private keys, trust anchor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey

from protocol.errors import MeshError, TrustError
from protocol.trust import Certificate, decode_certificate, decode_envelope, public_key_of

from .authority_store import read_key


class IdentityError(MeshError):
    """The identity files are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class Identity:
    cert_bytes: bytes
    cert: Certificate
    identity_seed: bytes
    static_private: bytes
    anchor: bytes

    @property
    def node_id(self) -> str:
        return self.cert.node_id


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def load_identity(cert_path: Path, identity_key: Path, static_key: Path, anchor_path: Path) -> Identity:
    cert_bytes = _read(cert_path, "certificate")
    try:
        cert = decode_certificate(decode_envelope(cert_bytes, "cert").payload)
    except TrustError as exc:
        raise IdentityError(f"{cert_path}: {exc}") from None
    try:
        seed = read_key(identity_key).seed
    except MeshError as exc:
        raise IdentityError(str(exc)) from None
    try:
        static = bytes.fromhex(_read(static_key, "static key").decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise IdentityError(f"{static_key}: not a static key file") from None
    if len(static) != 32:
        raise IdentityError(f"{static_key}: not a static key file")
    if public_key_of(seed) != cert.identity_key:
        raise IdentityError(f"{identity_key}: does not match the identity key in {cert_path}")
    if bytes(PrivateKey(static).public_key) != cert.static_key:
        raise IdentityError(f"{static_key}: does not match the static key in {cert_path}")
    return Identity(cert_bytes, cert, seed, static, _read(anchor_path, "trust anchor"))


def load_identity_dir(directory: Path) -> Identity:
    """An enrolled directory as `meshctl node enroll --out DIR` writes it."""
    d = Path(directory)
    return load_identity(d / "node.cert", d / "secrets" / "identity.key", d / "secrets" / "static.key",
                         d / "root.msgpack")
