"""What a `SecureSession` tells its shell: its state, and the events `receive_frame` returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.channel.identity import ConnectionKind
from protocol.trust.metadata import Certificate


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    peer: Certificate
    kind: ConnectionKind
    handshake_hash: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    reason: str


Event = HandshakeComplete | MessageReceived | PeerClosed
