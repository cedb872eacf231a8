"""Who a side of a channel is: its static key and certificate, and the kind of connection it opens.

A certificate holding the operator role (and only it) opens `ConnectionKind.OPERATOR` connections; one
without it is a node's and opens `ConnectionKind.GOSSIP` ones; one mixing the two is refused. `protocol.channel` uses
`is_operator` on the peer's certificate and `LocalIdentity` for its own.
"""

from __future__ import annotations

import enum
import hmac

from protocol.channel.noise import x25519_public_key
from protocol.errors import LocalProtocolError, RoleError, TrustError
from protocol.trust.metadata import OPERATOR_ROLE, Certificate, decode_certificate
from protocol.trust.signing import decode_envelope

__all__ = ["ConnectionKind", "LocalIdentity", "is_operator"]


class ConnectionKind(enum.Enum):
    """What a connection is for, decided by the initiator's certificate."""

    GOSSIP = "gossip"  # node <-> node
    OPERATOR = "operator"  # operator -> node: publish policy versions, read status


def is_operator(cert: Certificate) -> bool:
    """An operator certificate holds exactly the operator role; mixing it with node roles is refused."""
    if OPERATOR_ROLE in cert.roles:
        if len(cert.roles) != 1:
            raise RoleError(
                f"certificate {cert.node_id} ({cert.cert_id}) mixes {OPERATOR_ROLE!r} with node roles"
            )
        return True
    return False


class LocalIdentity:
    """This process's X25519 static key and the exact signed certificate envelope that names it.

    Built once (at start, and again when the certificate is renewed) and shared by every session:
    it checks that the certificate is well formed, names this static key and does not mix the
    operator role with node roles, and caches the public key so a handshake does not recompute it.
    Raises LocalProtocolError, since a bad identity is a local configuration error.
    """

    __slots__ = ("static_private", "static_public", "certificate", "cert", "kind")

    def __init__(self, static_private: bytes, certificate: bytes) -> None:
        try:
            self.static_public = x25519_public_key(bytes(static_private))
            self.cert = decode_certificate(decode_envelope(bytes(certificate), "cert").payload)
            operator = is_operator(self.cert)
        except TrustError as exc:
            raise LocalProtocolError(f"our own certificate is unusable: {exc}") from exc
        if not hmac.compare_digest(self.cert.static_key, self.static_public):
            raise LocalProtocolError("our certificate names another static key than static_private")
        self.static_private = bytes(static_private)
        self.certificate = bytes(certificate)
        self.kind = ConnectionKind.OPERATOR if operator else ConnectionKind.GOSSIP  # what it opens
