"""The operator client's WebSocket (RFC 6455, client side) on asyncio streams.

``meshctl`` talks to one node's mesh listener: one upgrade, a few binary messages, a close. aiohttp's
client costs ~250 ms to import on a small machine (its connector builds TLS contexts at import, which a
plain ``ws://`` channel carrying Noise never uses), more than the rest of a publish; this is the part of
RFC 6455 such a client needs: the upgrade and its ``Sec-WebSocket-Accept`` check, masked frames out,
unmasked frames in (fragmented messages joined, the size capped before a byte is buffered), pings
answered, the close handshake. No extensions are offered, so none can be negotiated.

The daemon's own peer connections keep aiohttp (client and server); tests run this client against the
daemon's aiohttp server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from dataclasses import dataclass

MESH_PATH = "/mesh"
"""The path of a node's mesh WebSocket (peers and operators)."""
REFUSED_CLOSE_CODE = 4403
"""WebSocket close code: the handshake was refused; the close reason is the reason label."""
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER_BYTES = 16 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketError(ConnectionError):
    """The upgrade was refused or the peer broke the framing."""


@dataclass(frozen=True, slots=True)
class WsMessage:
    """A received message: ``binary``/``text`` with its payload, or ``close`` with the peer's code (0 when
    it sent none, or the socket just ended) and reason."""

    kind: str
    data: bytes = b""
    code: int = 0
    reason: str = ""


def split_hostport(node: str) -> tuple[str, int]:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise WebSocketError(f"{node}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WebSocketClient:
    """One client WebSocket; :meth:`connect` opens it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_msg_size: int) -> None:
        self._reader, self._writer, self._max = reader, writer, max_msg_size
        self._close_sent = False
        self.closed = False

    @classmethod
    async def connect(cls, node: str, path: str, *, max_msg_size: int, connect_timeout_s: float) -> WebSocketClient:
        host, port = split_hostport(node)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout_s)
        try:
            key = base64.b64encode(os.urandom(16))
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         % (path.encode(), node.encode(), key))
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise WebSocketError(f"{node}: upgrade response headers too large") from None
            except asyncio.IncompleteReadError:
                raise WebSocketError(f"{node}: connection closed during the WebSocket upgrade") from None
            if len(head) > MAX_HEADER_BYTES:
                raise WebSocketError(f"{node}: upgrade response headers too large")
            status, *lines = head.decode("latin-1").split("\r\n")
            parts = status.split(" ", 2)
            if len(parts) < 2 or parts[1] != "101":
                raise WebSocketError(f"{node}: WebSocket upgrade refused: {status.strip() or 'no status line'}")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
            expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != expected:
                raise WebSocketError(f"{node}: WebSocket upgrade answered with a wrong Sec-WebSocket-Accept")
            if headers.get("sec-websocket-extensions"):
                raise WebSocketError(f"{node}: WebSocket extension negotiated that was not offered")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, max_msg_size)

    async def send_bytes(self, data: bytes) -> None:
        if self.closed or self._close_sent:
            raise WebSocketError("send on a closed WebSocket")
        self._writer.write(_frame(OP_BINARY, data))
        await self._writer.drain()

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        b1, b2 = await self._reader.readexactly(2)
        if b1 & 0x70:
            raise WebSocketError("WebSocket frame with reserved bits set")
        if b2 & 0x80:
            raise WebSocketError("masked WebSocket frame from the server")
        n = b2 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._reader.readexactly(8))
        opcode = b1 & 0x0F
        if n >= self._max or (opcode >= OP_CLOSE and n > 125):
            raise WebSocketError(f"WebSocket frame of {n} bytes over the cap")
        return bool(b1 & 0x80), opcode, await self._reader.readexactly(n)

    async def receive(self) -> WsMessage:
        """The next data message, or ``close`` (then the socket is closed)."""
        parts: list[bytes] = []
        kind = ""
        try:
            while True:
                fin, opcode, payload = await self._read_frame()
                if opcode == OP_PING:
                    if not self._close_sent:
                        self._writer.write(_frame(OP_PONG, payload))
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode == OP_CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
                    await self._finish(code)
                    return WsMessage("close", code=code, reason=payload[2:].decode("utf-8", "replace"))
                if opcode in (OP_TEXT, OP_BINARY):
                    if kind:
                        raise WebSocketError("WebSocket data frame inside a fragmented message")
                    kind = "text" if opcode == OP_TEXT else "binary"
                elif opcode != OP_CONT or not kind:
                    raise WebSocketError(f"unexpected WebSocket opcode {opcode}")
                parts.append(payload)
                if sum(map(len, parts)) >= self._max:
                    raise WebSocketError("WebSocket message over the cap")
                if fin:
                    return WsMessage(kind, b"".join(parts))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._abort()
            if isinstance(exc, WebSocketError):
                raise
            return WsMessage("close")

    async def _finish(self, code: int) -> None:
        if not self._close_sent:
            self._close_sent = True
            try:
                self._writer.write(_frame(OP_CLOSE, struct.pack("!H", code or 1000)))
                await self._writer.drain()
            except ConnectionError:
                pass
        self._abort()

    async def close(self, code: int = 1000) -> None:
        """Send our close and end the socket, without waiting for the peer's close frame (the caller has
        what it came for; on a lossy link that wait alone can cost a retransmission timeout)."""
        if self.closed:
            return
        if not self._close_sent:
            self._close_sent = True
            try:
                self._writer.write(_frame(OP_CLOSE, struct.pack("!H", code)))
                await asyncio.wait_for(self._writer.drain(), 1.0)
            except (ConnectionError, TimeoutError):
                pass
        self._abort()

    def _abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
