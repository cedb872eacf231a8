"""The member directory the enforcer renders from: each member's certificate bytes, by node id."""

from __future__ import annotations

from collections.abc import Mapping

from protocol.errors import TrustError
from protocol.metadata import Certificate, decode_certificate
from protocol.signing import decode_envelope


class MemberCertificates:
    """Always holds this node's own certificate; the rest comes from the stored directory at boot
    (re-verified there) and from the core's ``MembersChanged`` afterwards."""

    def __init__(self, own_id: str, own_cert: bytes) -> None:
        self._own = (own_id, own_cert)
        self._certs: dict[str, bytes] = {own_id: own_cert}

    def replace(self, certs: Mapping[str, bytes]) -> None:
        self._certs = dict(certs)
        self._certs.setdefault(*self._own)

    def snapshot(self) -> dict[str, bytes]:
        return dict(self._certs)

    def certificates(self) -> list[Certificate]:
        """The decoded certificates (verified when they entered the directory), for rendering."""
        out = []
        for data in self._certs.values():
            try:
                out.append(decode_certificate(decode_envelope(data, "cert").payload))
            except TrustError:
                continue
        return out
