"""Encrypted datagrams between two members that share an authenticated stream session.

Small gossip (digests, announces, probes, small bodies) can travel as UDP datagrams instead of on the
TCP stream, where a lost segment of a small message waits ~200 ms for a retransmission timer.  As in
WireGuard's transport messages, the Noise XX handshake on the stream authenticates both sides, and
each datagram then stands on its own:

    type (1 byte, 0x01) | receiver id (8) | counter (8, little endian) | ChaCha20-Poly1305(payload)

* Keys: one per direction, from the session's exporter secret (``HandshakeState.exporter_secret``)
  with HKDF and this module's own input, so they are independent of the stream's keys; the receiver
  ids come from the same output (a random-looking 8 bytes per direction, known to both sides only).
* The nonce is the explicit 64-bit counter (strictly increasing per sender); the header is the AEAD's
  associated data, so a changed id, counter or type fails authentication.
* A sliding replay window (``REPLAY_WINDOW`` counters, RFC 6479 style, as WireGuard) refuses a counter
  seen before or too far behind the highest one; the window moves only after a datagram
  authenticated, so forged datagrams cannot push it.
* Every refusal raises ``DatagramRefused`` with a stable ``reason`` (``truncated``, ``oversize``,
  ``bad_type``, ``unknown_session``, ``replayed``, ``too_old``, ``forged``) that the shell counts.
  A datagram never gets an answer here: the shell only ever answers authenticated datagrams, with
  messages no larger than what the core would have sent anyway.

Sans-IO: bytes in, bytes out; no clock, no socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from nacl import bindings
from nacl.exceptions import CryptoError

from protocol.channel.noise_cipher import BLAKE2B, KEY_LEN, TAG_LEN, hkdf
from protocol.errors import LocalProtocolError, RemoteProtocolError

DATAGRAM_INPUT: Final = b"policymesh/v1/datagram"
TYPE_TRANSPORT: Final = 0x01
ID_LEN: Final = 8
HEADER: Final = struct.Struct("<B8sQ")  # type, receiver id, counter
OVERHEAD: Final = HEADER.size + TAG_LEN  # 33 bytes
MAX_PAYLOAD: Final = 1200
"""The largest payload sent as one datagram; larger messages go on the stream (no IP fragmentation:
1200 + 33 + UDP/IPv6 headers stays under a 1280-byte IPv6 minimum MTU)."""
MAX_DATAGRAM: Final = MAX_PAYLOAD + OVERHEAD
REPLAY_WINDOW: Final = 2048
MAX_COUNTER: Final = 2**64 - 2  # 2^64 - 1 is never used (as Noise's reserved nonce)
_NONCE_PREFIX: Final = bytes(4)


class DatagramRefused(RemoteProtocolError):
    """A datagram that is not accepted; ``reason`` is a stable label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DatagramKeys:
    send_key: bytes
    recv_key: bytes
    send_id: bytes  # the id the peer knows this session by (we put it in what we send)
    recv_id: bytes  # the id we know this session by (the peer puts it in what it sends)


def derive_keys(exporter_secret: bytes, initiator: bool) -> DatagramKeys:
    """This side's datagram keys and ids from the stream session's exporter secret."""
    out_ir, out_ri = hkdf(BLAKE2B, exporter_secret, DATAGRAM_INPUT, 2)
    key_ir, id_r = out_ir[:KEY_LEN], out_ir[KEY_LEN:KEY_LEN + ID_LEN]
    key_ri, id_i = out_ri[:KEY_LEN], out_ri[KEY_LEN:KEY_LEN + ID_LEN]
    if initiator:
        return DatagramKeys(key_ir, key_ri, id_r, id_i)
    return DatagramKeys(key_ri, key_ir, id_i, id_r)


def receiver_id(datagram: bytes) -> bytes | None:
    """The receiver id of a transport datagram (to find its session), None when it cannot be one."""
    if len(datagram) < OVERHEAD or datagram[0] != TYPE_TRANSPORT:
        return None
    return bytes(datagram[1:1 + ID_LEN])


class ReplayWindow:
    """The counters accepted so far, as the highest one and a bitmap of the ``size`` below it."""

    __slots__ = ("size", "top", "_bits")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        if size < 64:
            raise LocalProtocolError("a replay window needs at least 64 counters")
        self.size = size
        self.top = -1
        self._bits = 0  # bit i: counter top - i was accepted

    def check(self, counter: int) -> str | None:
        """None if ``counter`` may be accepted; else why not (``replayed`` or ``too_old``)."""
        if counter > self.top:
            return None
        back = self.top - counter
        if back >= self.size:
            return "too_old"
        return "replayed" if (self._bits >> back) & 1 else None

    def mark(self, counter: int) -> None:
        """Record an accepted counter (call only after ``check`` passed and the datagram authenticated)."""
        if counter > self.top:
            shift = counter - self.top
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = counter
        else:
            self._bits |= 1 << (self.top - counter)


class DatagramChannel:
    """Sealing and opening datagrams for one session (one peer, one stream handshake)."""

    def __init__(self, keys: DatagramKeys, window: int = REPLAY_WINDOW) -> None:
        self.keys = keys
        self._next = 0
        self._window = ReplayWindow(window)
        self.sent = 0
        self.received = 0

    def seal(self, payload: bytes) -> bytes:
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"datagram payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        counter = self._next
        if counter > MAX_COUNTER:
            raise LocalProtocolError("datagram counter exhausted: open a new session")
        self._next = counter + 1
        header = HEADER.pack(TYPE_TRANSPORT, self.keys.send_id, counter)
        nonce = _NONCE_PREFIX + counter.to_bytes(8, "little")
        self.sent += 1
        return header + bindings.crypto_aead_chacha20poly1305_ietf_encrypt(payload, header, nonce,
                                                                           self.keys.send_key)

    def open(self, datagram: bytes) -> bytes:
        """The payload of an authentic, fresh datagram; DatagramRefused otherwise."""
        if len(datagram) < OVERHEAD:
            raise DatagramRefused("truncated", f"datagram of {len(datagram)} bytes is shorter than its header")
        if len(datagram) > MAX_DATAGRAM:
            raise DatagramRefused("oversize", f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
        kind, rid, counter = HEADER.unpack_from(datagram)
        if kind != TYPE_TRANSPORT:
            raise DatagramRefused("bad_type", f"datagram type {kind}")
        if rid != self.keys.recv_id:
            raise DatagramRefused("unknown_session", "datagram for another session")
        if counter > MAX_COUNTER:
            raise DatagramRefused("forged", "reserved counter")
        why = self._window.check(counter)
        if why is not None:
            raise DatagramRefused(why, f"datagram counter {counter} {why.replace('_', ' ')}")
        header = bytes(datagram[:HEADER.size])
        nonce = _NONCE_PREFIX + counter.to_bytes(8, "little")
        try:
            payload = bindings.crypto_aead_chacha20poly1305_ietf_decrypt(bytes(datagram[HEADER.size:]), header,
                                                                         nonce, self.keys.recv_key)
        except CryptoError:
            raise DatagramRefused("forged", "datagram did not authenticate") from None
        self._window.mark(counter)
        self.received += 1
        return payload
