"""A sans-IO secure session: Noise XX with authority-signed certificates, then chunked transport.

Shape (h11/wsproto): the shell feeds each frame it receives to `receive_frame(frame, now_ms, wall_s)`
and gets events back; every frame the session wants on the wire comes out of `frames_to_send()` (or is
returned directly by `send_message` / `close`, which drain the same queue so order is kept). One frame is
one Noise message (at most 65535 bytes), carried by the daemon as one WebSocket binary message. No I/O,
no clock, no hidden entropy: monotonic milliseconds, wall-clock seconds and `entropy(n)` come in.

Handshake (Noise_XX_25519_ChaChaPoly_BLAKE2b), prologue ``b"policymesh/v1\\0" + cluster``::

    -> e                                  payload: empty
    <- e, ee, s, es                       payload: responder's signed certificate envelope
    -> s, se                              payload: initiator's signed certificate envelope

Each side verifies the other's certificate with `TrustedState.verify_certificate` (enroll signatures,
validity window, revocation by the current policy) and requires its X25519 `static_key` to equal the
Noise remote static key; then the connection kind: the responder is always a node, the initiator's
certificate decides between `ConnectionKind.GOSSIP` (node to node) and `ConnectionKind.OPERATOR`
(operator to node: publish, status), which must be among the kinds the session accepts.

Transport (`protocol.channel.transport`): each frame decrypts (in strict nonce order: a replayed,
reordered, truncated or altered frame kills the session) to one type byte and a body. An application
message is sent as one or more chunk frames, reassembled under `max_message_bytes` (one cap, or one per
connection kind: a node reassembles gossip messages under the gossip message cap and operator requests
under the operator request cap); a close frame carries a reason. Every `rekey_interval` frames in a
direction both ends Rekey() that direction's key.

Errors (all `MeshError`): `RemoteProtocolError` or `TrustError` - the peer is to blame, drop it;
`LocalProtocolError` - the caller misused the session. Any error kills the session; later calls raise
`SessionClosedError`.

This module owns the session: the handshake, the peer's certificate and the session's state; the
established phase's framing is `Transport` in `protocol.channel.transport`. Its events are in
`protocol.channel.events`, its error types in `protocol.channel.errors`, `LocalIdentity` and
`ConnectionKind` in `protocol.channel.identity`, the `HandshakeRateLimiter` in
`protocol.channel.rate_limit`. All are re-exported here.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final

from protocol.channel.datagram import DatagramKeys, derive_keys
from protocol.channel.errors import (
    FrameError,
    HandshakeTimeoutError,
    KeyMismatchError,
    MessageTooLargeError,
    PeerMessageTooLargeError,
    SessionClosedError,
    UnexpectedPeerError,
)
from protocol.channel.events import Event, HandshakeComplete, MessageReceived, PeerClosed, SessionState
from protocol.channel.identity import ConnectionKind, LocalIdentity, is_operator
from protocol.channel.noise import DecryptError, Entropy, NoiseXX
from protocol.channel.rate_limit import HandshakeRateLimiter
from protocol.channel.transport import CHUNK_BYTES, MAX_CLOSE_REASON_BYTES, REKEY_INTERVAL_FRAMES, Transport
from protocol.errors import LocalProtocolError, MeshError, RoleError
from protocol.trust.metadata import Certificate
from protocol.trust.state import TrustedState

__all__ = [
    "CHUNK_BYTES",
    "HANDSHAKE_TIMEOUT_MS",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REKEY_INTERVAL_FRAMES",
    "ConnectionKind",
    "Event",
    "FrameError",
    "HandshakeComplete",
    "HandshakeRateLimiter",
    "HandshakeTimeoutError",
    "KeyMismatchError",
    "LocalIdentity",
    "MessageReceived",
    "MessageTooLargeError",
    "PeerClosed",
    "PeerMessageTooLargeError",
    "SecureSession",
    "SessionClosedError",
    "SessionState",
    "UnexpectedPeerError",
    "prologue_for",
]

PROTOCOL_VERSION: Final = b"policymesh/v1"
HANDSHAKE_TIMEOUT_MS: Final = 10_000
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


def prologue_for(cluster: str) -> bytes:
    """The Noise prologue: protocol version and cluster name, so a peer of another cluster or version
    fails the handshake at its first authenticated message."""
    return PROTOCOL_VERSION + b"\0" + cluster.encode("utf-8")


# --------------------------------------------------------------------------------------------- session


class SecureSession:
    """One mutually authenticated, forward-secret connection, from the first handshake frame to close.

    `initiator`: the side that connected. `identity`: this side's static key and certificate (or,
    equivalently but re-checked per session, `static_private` and `certificate` bytes).
    `accept`: the connection kinds allowed - the acceptor passes what its listener serves; the
    initiator passes the kind it is opening (its identity's kind must be among them).
    `expected_peer`: the initiator may name the node id it meant to reach.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        trust: TrustedState,
        identity: LocalIdentity | None = None,
        static_private: bytes | None = None,
        certificate: bytes | None = None,
        entropy: Entropy,
        now_ms: int,
        accept: frozenset[ConnectionKind] = frozenset({ConnectionKind.GOSSIP}),
        expected_peer: str | None = None,
        handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS,
        max_message_bytes: int | Mapping[ConnectionKind, int] = MAX_MESSAGE_BYTES,
        rekey_interval: int = REKEY_INTERVAL_FRAMES,
    ) -> None:
        caps = (
            {k: max_message_bytes for k in ConnectionKind}
            if isinstance(max_message_bytes, int)
            else dict(max_message_bytes)
        )
        if handshake_timeout_ms <= 0 or rekey_interval <= 0 or any(v <= 0 for v in caps.values()):
            raise LocalProtocolError("timeouts, caps and the rekey interval must be positive")
        if not set(accept) <= caps.keys():
            raise LocalProtocolError("max_message_bytes must name a cap for every accepted connection kind")
        if not accept:
            raise LocalProtocolError("accept must name at least one connection kind")
        if identity is None:
            if static_private is None or certificate is None:
                raise LocalProtocolError("pass identity, or static_private and certificate")
            identity = LocalIdentity(static_private, certificate)
        elif static_private is not None or certificate is not None:
            raise LocalProtocolError("pass identity or static_private and certificate, not both")
        self.initiator = initiator
        self._trust = trust
        self._identity = identity
        self._accept = frozenset(accept)
        self._expected_peer = expected_peer
        self._caps = caps
        # Until the handshake decides the connection kind, the smallest cap applies (nothing is
        # reassembled during the handshake anyway).
        self._max_message = min(caps[k] for k in accept)
        self._rekey_interval = rekey_interval
        self._deadline_ms: int | None = now_ms + handshake_timeout_ms
        if initiator and identity.kind not in self._accept:
            raise LocalProtocolError(f"our certificate opens {identity.kind.value} connections, not {accept}")
        if not initiator and identity.kind is ConnectionKind.OPERATOR:
            raise LocalProtocolError("an operator certificate cannot accept connections")
        self._noise: NoiseXX | None = NoiseXX(
            initiator,
            identity.static_private,
            prologue_for(trust.cluster),
            entropy=entropy,
            static_public=identity.static_public,
        )

        self.state = SessionState.HANDSHAKE
        self.peer: Certificate | None = None
        self.peer_certificate: bytes | None = None
        self.kind: ConnectionKind | None = None
        self.handshake_hash: bytes | None = None
        self._exporter: bytes | None = None
        self._remote_static: bytes | None = None
        self._checked_under: object | None = None  # the trusted root the peer's certificate was checked under
        self._transport: Transport | None = None
        self._outbox: list[bytes] = []
        self._failure: str | None = None
        self._closed_locally = False
        if initiator:
            self._outbox.append(self._noise.write_message(b""))

    # ------------------------------------------------------------------ shell-facing API

    @property
    def max_message_bytes(self) -> int:
        """The cap on one application message in either direction (per kind once the handshake is done)."""
        return self._max_message

    def datagram_keys(self) -> DatagramKeys:
        """This side's datagram keys for the peer of this open session (see protocol.channel.datagram)."""
        if self._exporter is None:
            raise LocalProtocolError("datagram keys before the handshake completed")
        return derive_keys(self._exporter, self.initiator)

    def frames_to_send(self) -> list[bytes]:
        """Drain the frames waiting to go out, in order (handshake replies, the initiator's first)."""
        frames, self._outbox = self._outbox, []
        return frames

    def deadline(self) -> int | None:
        """Monotonic ms by which the handshake must complete; None once it has (or the session ended)."""
        return self._deadline_ms if self.state is SessionState.HANDSHAKE else None

    def handle_timer(self, now_ms: int) -> None:
        """Raise `HandshakeTimeoutError` (and fail the session) if the handshake deadline has passed."""
        if (
            self.state is SessionState.HANDSHAKE
            and self._deadline_ms is not None
            and now_ms >= self._deadline_ms
        ):
            self._fail("handshake timed out")
            raise HandshakeTimeoutError(f"handshake not complete by {self._deadline_ms} ms")

    def receive_frame(self, frame: bytes, now_ms: int, wall_s: float) -> list[Event]:
        """Process one frame from the peer. `now_ms` (monotonic) checks the handshake deadline;
        `wall_s` (unix seconds) the peer certificate's validity."""
        if self.state is SessionState.FAILED or self._closed_locally:
            raise SessionClosedError(f"session is {self.state.value}: {self._failure}")
        if self.state is SessionState.CLOSED:
            self._fail("frame after the peer closed")
            raise FrameError("frame received after the peer closed the session")
        self.handle_timer(now_ms)
        try:
            if self.state is SessionState.HANDSHAKE:
                return self._receive_handshake(bytes(frame), wall_s)
            return self._receive_transport(bytes(frame))
        except MeshError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    def send_message(self, data: bytes) -> list[bytes]:
        """Encrypt one application message; returns every frame now due, in order."""
        self._require_open()
        size = len(data)
        if size > self._max_message:
            raise MessageTooLargeError(f"message of {size} bytes exceeds the {self._max_message}-byte cap")
        transport = self._transport
        assert transport is not None
        transport.write_message(data, self._outbox)
        return self.frames_to_send()

    def close(self, reason: str = "") -> list[bytes]:
        """End the session. Once open, the peer is told why (a `PeerClosed` event on its side)."""
        encoded = reason.encode("utf-8")
        if len(encoded) > MAX_CLOSE_REASON_BYTES:
            raise LocalProtocolError(f"close reason longer than {MAX_CLOSE_REASON_BYTES} bytes")
        if self.state is SessionState.OPEN:
            assert self._transport is not None
            self._outbox.append(self._transport.close_frame(encoded))
        elif self.state is SessionState.HANDSHAKE:
            self._outbox = []  # an unfinished handshake is simply abandoned
        if self.state is SessionState.FAILED:
            return []
        self._closed_locally = True
        self._failure = self._failure or "closed locally"
        self.state = SessionState.CLOSED
        self._noise = None
        self._transport = None
        return self.frames_to_send()

    def revalidate(self, wall_s: float) -> None:
        """Re-verify the peer's certificate against the current trust state (after a new policy or
        root, or as its expiry passes); raises the TrustError and kills the session if it no longer
        holds."""
        certificate, remote_static = self.peer_certificate, self._remote_static
        if self.state is not SessionState.OPEN or certificate is None or remote_static is None:
            raise SessionClosedError("only an open session can be revalidated")
        root = self._trust.root
        try:
            if self._checked_under is root and self.peer is not None:
                # The same bytes under the same root: signature, static key and role hold as checked at
                # the handshake; what time and a new policy change (validity window, revocation) is
                # checked again.  (Re-verifying every channel's signature each period cost an Ed25519
                # verification per channel per node: O(n) per node, O(n^2) for the mesh.)
                self._trust.check_certificate_now(self.peer, wall_s)
            else:
                self._verify_peer(certificate, wall_s, remote_static)
                self._checked_under = root
        except MeshError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    # ------------------------------------------------------------------ handshake

    def _receive_handshake(self, frame: bytes, wall_s: float) -> list[Event]:
        noise = self._noise
        assert noise is not None
        try:
            payload = noise.read_message(frame)
        except DecryptError as exc:
            raise DecryptError(
                "handshake did not authenticate: the peer runs another cluster or protocol version, "
                "or the frame was altered"
            ) from exc
        if noise.remote_static is None:  # responder, message 1: ephemeral key only
            if payload:
                raise FrameError("the first handshake message must carry no payload")
            self._outbox.append(noise.write_message(self._identity.certificate))
            return []
        # initiator reading message 2, or responder reading message 3: the peer's certificate
        peer, kind = self._verify_peer(payload, wall_s, noise.remote_static)
        self._checked_under = self._trust.root
        if not noise.complete:
            self._outbox.append(noise.write_message(self._identity.certificate))
        assert noise.complete
        send, recv = noise.split()
        self.handshake_hash = noise.handshake_hash
        self._exporter = noise.exporter_secret
        self._remote_static = noise.remote_static
        self.peer, self.peer_certificate, self.kind = peer, payload, kind
        self._max_message = self._caps[kind]
        self._transport = Transport(
            send, recv, rekey_interval=self._rekey_interval, max_message_bytes=self._max_message
        )
        self.state = SessionState.OPEN
        self._noise = None
        return [HandshakeComplete(peer, kind, self.handshake_hash)]

    def _verify_peer(
        self, envelope: bytes, wall_s: float, remote_static: bytes
    ) -> tuple[Certificate, ConnectionKind]:
        cert = self._trust.verify_certificate(envelope, wall_s)
        if not hmac.compare_digest(cert.static_key, remote_static):
            raise KeyMismatchError(
                f"certificate {cert.node_id} ({cert.cert_id}) names another static key than the peer holds"
            )
        peer_is_operator = is_operator(cert)
        if self.initiator:
            if peer_is_operator:
                raise RoleError(
                    f"{cert.node_id} holds an operator certificate; only nodes accept connections"
                )
            if self._expected_peer is not None and cert.node_id != self._expected_peer:
                raise UnexpectedPeerError(f"reached {cert.node_id}, expected {self._expected_peer}")
            kind = self._identity.kind
        else:
            kind = ConnectionKind.OPERATOR if peer_is_operator else ConnectionKind.GOSSIP
            if kind not in self._accept:
                raise RoleError(
                    f"{cert.node_id} ({', '.join(cert.roles)}) may not open a {kind.value} connection here"
                )
        return cert, kind

    # ------------------------------------------------------------------ transport

    def _receive_transport(self, frame: bytes) -> list[Event]:
        transport = self._transport
        assert transport is not None
        event = transport.receive(frame)
        if event is None:
            return []
        if isinstance(event, PeerClosed):
            self.state = SessionState.CLOSED
            self._failure = "closed by the peer"
        return [event]

    # ------------------------------------------------------------------ state

    def _require_open(self) -> None:
        if self.state is SessionState.HANDSHAKE:
            raise LocalProtocolError("the handshake is not complete yet")
        if self.state is not SessionState.OPEN:
            raise SessionClosedError(f"session is {self.state.value}: {self._failure}")

    def _fail(self, why: str) -> None:
        self.state = SessionState.FAILED
        self._failure = why
        self._noise = None
        self._transport = None
        self._outbox = []
