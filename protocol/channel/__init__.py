"""Channel: the encrypted, mutually authenticated link between two members (or an operator and a node).

* ``noise_cipher``, ``noise_patterns``, ``noise_handshake``, ``noise``, ``noise_errors``: the Noise
  Protocol Framework (revision 34) on PyNaCl: cipher and symmetric state, the pattern tables, the
  handshake interpreter, the named handshakes (XX for the mesh; NN and IK for the test vectors), and
  its errors.
* ``identity``    who a side is: static key, authority-signed certificate, connection kind.
* ``rate_limit``  the per-source handshake rate limiter.
* ``session``     ``SecureSession``: Noise XX with certificates checked against the trusted root, then
                  the transport; sans-IO (frames in, events and frames out).
* ``transport``   the established phase: messages as encrypted, chunked, rekeyed frames.
* ``errors``      what a session raises besides the Noise layer's errors.
* ``events``      the session state and the events it returns to its shell.

The shells import from here (``from protocol.channel import SecureSession, LocalIdentity``).
"""

from protocol.channel.noise import DecryptError, NoiseError
from protocol.channel.session import (
    CHUNK_BYTES,
    HANDSHAKE_TIMEOUT_MS,
    MAX_CLOSE_REASON_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REKEY_INTERVAL_FRAMES,
    ConnectionKind,
    Event,
    FrameError,
    HandshakeComplete,
    HandshakeRateLimiter,
    HandshakeTimeoutError,
    KeyMismatchError,
    LocalIdentity,
    MessageReceived,
    MessageTooLargeError,
    PeerClosed,
    PeerMessageTooLargeError,
    SecureSession,
    SessionClosedError,
    SessionState,
    UnexpectedPeerError,
    prologue_for,
)

__all__ = [
    "CHUNK_BYTES",
    "ConnectionKind",
    "DecryptError",
    "Event",
    "FrameError",
    "HANDSHAKE_TIMEOUT_MS",
    "HandshakeComplete",
    "HandshakeRateLimiter",
    "HandshakeTimeoutError",
    "KeyMismatchError",
    "LocalIdentity",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_MESSAGE_BYTES",
    "MessageReceived",
    "MessageTooLargeError",
    "NoiseError",
    "PROTOCOL_VERSION",
    "PeerClosed",
    "PeerMessageTooLargeError",
    "REKEY_INTERVAL_FRAMES",
    "SecureSession",
    "SessionClosedError",
    "SessionState",
    "UnexpectedPeerError",
    "prologue_for",
]
