"""The errors a `SecureSession` (`protocol.channel`) raises besides those of the Noise layer.

`RemoteProtocolError` or `TrustError`: the peer is to blame, drop it; `LocalProtocolError`: the
caller misused the session.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError, RemoteProtocolError, TrustError

__all__ = [
    "FrameError",
    "HandshakeTimeoutError",
    "KeyMismatchError",
    "MessageTooLargeError",
    "PeerMessageTooLargeError",
    "SessionClosedError",
    "UnexpectedPeerError",
]


class SessionClosedError(LocalProtocolError):
    """The session is closed or failed earlier; the caller must drop it."""


class FrameError(RemoteProtocolError):
    """A frame decrypted but is not valid here (unknown type, bad chunking, data after close)."""


class PeerMessageTooLargeError(RemoteProtocolError):
    """The peer's application message exceeds `max_message_bytes`."""


class MessageTooLargeError(LocalProtocolError):
    """`send_message` was given more than `max_message_bytes`."""


class HandshakeTimeoutError(RemoteProtocolError):
    """The handshake did not complete by its deadline."""


class KeyMismatchError(TrustError):
    """The certificate is valid but names another X25519 static key than the one the peer proved it
    holds in the handshake: someone else's certificate."""

    reason = "static_key_mismatch"


class UnexpectedPeerError(TrustError):
    """The initiator reached a valid node, but not the one it meant to reach."""

    reason = "unexpected_peer"
