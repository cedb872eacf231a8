"""The established phase of a `SecureSession`: application messages as encrypted, chunked, rekeyed frames.

After the handshake the two `CipherState`s from `split()` carry everything. Each frame decrypts (in
strict nonce order: a replayed, reordered, truncated or altered frame raises) to one type byte and a
body. An application message is sent as zero or more `_CHUNK_MORE` frames and one `_CHUNK_END` frame,
reassembled under the session's message cap; `_CLOSE` carries a reason. Every `rekey_interval` frames
in a direction both ends Rekey() that direction's key.

This object knows nothing of certificates, connection kinds or session states: `SecureSession`
creates it when the handshake completes, drops it when the session ends, and turns what it raises
into the session's failure.
"""

from __future__ import annotations

from typing import Final

from protocol.channel.errors import FrameError, PeerMessageTooLargeError
from protocol.channel.events import MessageReceived, PeerClosed
from protocol.channel.noise import MAX_MESSAGE_LEN, TAG_LEN, CipherState

__all__ = ["CHUNK_BYTES", "MAX_CLOSE_REASON_BYTES", "REKEY_INTERVAL_FRAMES", "Transport"]

REKEY_INTERVAL_FRAMES: Final = 1 << 14
MAX_CLOSE_REASON_BYTES: Final = 256

_CHUNK_MORE: Final = b"\x00"
_CHUNK_END: Final = b"\x01"
_CLOSE: Final = b"\x02"
CHUNK_BYTES: Final = MAX_MESSAGE_LEN - TAG_LEN - 1
"""Application bytes per transport frame: 65535 minus the AEAD tag and the type byte."""


class Transport:
    """One session's transport: `send`/`recv` cipher states, the rekey interval, and the reassembly of
    a chunked peer message under `max_message_bytes`."""

    def __init__(
        self, send: CipherState, recv: CipherState, *, rekey_interval: int, max_message_bytes: int
    ) -> None:
        self._send = send
        self._recv = recv
        self._rekey_interval = rekey_interval
        self._max_message = max_message_bytes
        self._partial: list[bytes | memoryview] = []
        self._partial_len = 0

    def write_message(self, data: bytes, out: list[bytes]) -> None:
        """Append the frames of one application message to `out` (the caller checked its size)."""
        size = len(data)
        if size <= CHUNK_BYTES:
            out.append(self._encrypt(_CHUNK_END + data))
            return
        view = memoryview(data)
        last = size - CHUNK_BYTES
        for offset in range(0, size, CHUNK_BYTES):
            out.append(
                self._encrypt((_CHUNK_MORE if offset < last else _CHUNK_END) + view[offset : offset + CHUNK_BYTES])
            )

    def close_frame(self, reason: bytes) -> bytes:
        """The frame that tells the peer why the session ends (at most MAX_CLOSE_REASON_BYTES)."""
        return self._encrypt(_CLOSE + reason)

    def receive(self, frame: bytes) -> MessageReceived | PeerClosed | None:
        """Decrypt one frame: a whole message, the peer's close, or None (a chunk of a longer message).
        Raises `DecryptError`, `FrameError` or `PeerMessageTooLargeError` (the peer is to blame)."""
        recv = self._recv
        plaintext = recv.decrypt(b"", frame)
        if recv.nonce % self._rekey_interval == 0:
            recv.rekey()
        if not plaintext:
            raise FrameError("empty transport frame")
        kind = plaintext[:1]
        if kind == _CHUNK_END:
            if not self._partial:
                return MessageReceived(plaintext[1:])
            self._add_chunk(memoryview(plaintext)[1:])
            data = b"".join(self._partial)
            self._partial, self._partial_len = [], 0
            return MessageReceived(data)
        if kind == _CHUNK_MORE:
            if len(plaintext) == 1:
                raise FrameError("empty continuation chunk")
            self._add_chunk(memoryview(plaintext)[1:])
            return None
        if kind == _CLOSE:
            if self._partial:
                raise FrameError("close in the middle of a chunked message")
            if len(plaintext) - 1 > MAX_CLOSE_REASON_BYTES:
                raise FrameError("close reason too long")
            return PeerClosed(plaintext[1:].decode("utf-8", errors="replace"))
        raise FrameError(f"unknown frame type {kind.hex()}")

    def _encrypt(self, plaintext: bytes) -> bytes:
        send = self._send
        frame = send.encrypt(b"", plaintext)
        if send.nonce % self._rekey_interval == 0:
            send.rekey()
        return frame

    def _add_chunk(self, chunk: memoryview) -> None:
        self._partial_len += len(chunk)
        if self._partial_len > self._max_message:
            raise PeerMessageTooLargeError(f"peer message exceeds the {self._max_message}-byte cap")
        self._partial.append(chunk)
