"""The errors of the Noise layer (`protocol.channel.noise`, `protocol.channel.noise_cipher`).

Blame follows h11: errors caused by the bytes a peer sent are `RemoteProtocolError`s, misuse of the
API is a `LocalProtocolError`; every one is a `NoiseError`.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "DecryptError",
    "HandshakeFailedError",
    "LowOrderPointError",
    "MalformedMessageError",
    "MessageTooLongError",
    "NoiseError",
    "NonceExhaustedError",
    "OutOfTurnError",
]


class NoiseError(ProtocolError):
    """Base of every error raised by the Noise layer."""


class DecryptError(NoiseError, RemoteProtocolError):
    """Authentication failed: the ciphertext was forged, corrupted, replayed or reordered, or the peer
    used a different prologue (protocol version or cluster)."""


class MalformedMessageError(NoiseError, RemoteProtocolError):
    """A received message is too short for its handshake tokens or longer than 65535 bytes."""


class LowOrderPointError(NoiseError, RemoteProtocolError):
    """A Diffie-Hellman with the peer's key gave the all-zero shared secret (a low-order point)."""


class OutOfTurnError(NoiseError, LocalProtocolError):
    """write_message/read_message called when it is the other party's turn or after completion, or
    split() before completion."""


class HandshakeFailedError(NoiseError, LocalProtocolError):
    """The handshake already failed; the specification requires it to be discarded."""


class MessageTooLongError(NoiseError, LocalProtocolError):
    """The message to write would exceed 65535 bytes."""


class NonceExhaustedError(NoiseError, LocalProtocolError):
    """The CipherState reached the reserved nonce 2^64-1; the session must be replaced."""
