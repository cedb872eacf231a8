"""Typed errors, split by blame (h11 style).

Everything policymesh raises derives from :class:`MeshError`.  Protocol errors say whose fault it was
(``LocalProtocolError``: we misused the API; ``RemoteProtocolError``: the peer sent something wrong).
Trust errors say why a signed object was refused, in words an operator understands.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every policymesh error."""


class ProtocolError(MeshError):
    """A protocol state machine was driven into an invalid state."""


class LocalProtocolError(ProtocolError):
    """We (the local side) misused the protocol: a bug in the caller."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved; it costs the peer its connection, never the node."""


class TrustError(MeshError):
    """A signed object was refused. ``reason`` is a stable snake_case label for metrics."""

    reason = "untrusted"


class FormatError(TrustError):
    """Bytes are not a well-formed object of the expected type (or exceed the size cap)."""

    reason = "malformed"


class SignatureError(TrustError):
    """Not enough valid signatures from distinct keys of the required role."""

    reason = "bad_signature"


class RollbackError(TrustError):
    """An older version than the one already trusted."""

    reason = "rollback"


class EquivocationError(TrustError):
    """Two different objects signed with the same version/serial: the signer is compromised or broken."""

    reason = "equivocation"


class ExpiredError(TrustError):
    """The object's validity ended."""

    reason = "expired"


class NotYetValidError(TrustError):
    """The object's validity has not started (or was issued in the future)."""

    reason = "not_yet_valid"


class RevokedError(TrustError):
    """The certificate or node was revoked by the current policy."""

    reason = "revoked"


class RootMismatchError(TrustError):
    """The object was signed under another root version than the trusted one."""

    reason = "root_mismatch"

    def __init__(self, message: str, needed_version: int | None = None) -> None:
        super().__init__(message)
        self.needed_version = needed_version


class RoleError(TrustError):
    """The certificate holder lacks the role needed for this action."""

    reason = "role"


class PolicyError(MeshError):
    """A policy document (TOML) is invalid; the message names the rule and field."""
