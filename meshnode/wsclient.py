"""The operator client's WebSocket: wsproto (sans-IO RFC 6455) driven over asyncio streams.

``meshctl`` talks to one node's mesh listener: one upgrade, a few binary messages, a close. aiohttp's
client costs ~250 ms to import on a small machine (its connector builds TLS contexts at import, which a
plain ``ws://`` channel carrying Noise never uses), more than the rest of a publish. wsproto (with h11
for the upgrade) does the protocol — the upgrade and its ``Sec-WebSocket-Accept`` check, masking,
frame parsing, fragments, UTF-8 of text, close codes — and imports in a few milliseconds; this module is
its asyncio side: it moves bytes between the socket and the ``WSConnection``, answers pings, caps a
message's size as its fragments arrive (wsproto hands payload over as it is read, so no more than the cap
plus one socket read is ever buffered), surfaces the peer's close code and reason, and turns every
refusal or protocol error into :class:`WebSocketError`. No extensions are offered, so none can be
negotiated (wsproto refuses one that was not offered).

The daemon's own peer connections keep aiohttp (client and server); tests run this client against the
daemon's aiohttp server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

MESH_PATH = "/mesh"
"""The path of a node's mesh WebSocket (peers and operators)."""
REFUSED_CLOSE_CODE = 4403
"""WebSocket close code: the handshake was refused; the close reason is the reason label."""
READ_BYTES = 64 * 1024
"""One socket read: the most a message can be buffered beyond its cap before the cap is checked."""
_NO_CODE = (1005, 1006)  # "no status received", "closed abnormally": reported as code 0


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


async def _upgrade(ws: WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   node: str, path: str) -> None:
    writer.write(ws.send(Request(host=node, target=path)))
    while True:
        data = await reader.read(READ_BYTES)
        if not data:
            raise WebSocketError(f"{node}: connection closed during the WebSocket upgrade")
        try:
            ws.receive_data(data)  # h11 caps the response head (16 KiB): a longer one is a RemoteProtocolError
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise WebSocketError(f"{node}: WebSocket upgrade refused: HTTP {event.status_code}")
        except RemoteProtocolError as exc:
            raise WebSocketError(f"{node}: bad WebSocket upgrade response: {exc}") from None


class WebSocketClient:
    """One client WebSocket; :meth:`connect` opens it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection,
                 max_msg_size: int) -> None:
        self._reader, self._writer, self._ws, self._max = reader, writer, ws, max_msg_size
        self._parts: list[bytes] = []
        self._size = 0
        self.closed = False

    @classmethod
    async def connect(cls, node: str, path: str, *, max_msg_size: int, connect_timeout_s: float) -> WebSocketClient:
        host, port = split_hostport(node)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout_s)
        ws = WSConnection(ConnectionType.CLIENT)
        try:
            await _upgrade(ws, reader, writer, node, path)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, ws, max_msg_size)

    async def send_bytes(self, data: bytes) -> None:
        if self.closed or self._ws.state is not ConnectionState.OPEN:
            raise WebSocketError("send on a closed WebSocket")
        self._writer.write(self._ws.send(BytesMessage(data=data)))
        await self._writer.drain()

    async def receive(self) -> WsMessage:
        """The next data message (below ``max_msg_size``), or ``close`` (then the socket is closed)."""
        try:
            while True:
                for event in self._ws.events():
                    msg = await self._handle(event)
                    if msg is not None:
                        return msg
                data = await self._reader.read(READ_BYTES)
                if not data:
                    self._abort()
                    return WsMessage("close")
                self._ws.receive_data(data)
        except WebSocketError:
            self._abort()
            raise
        except (ConnectionError, LocalProtocolError):
            self._abort()
            return WsMessage("close")

    async def _handle(self, event: object) -> WsMessage | None:
        if isinstance(event, BytesMessage | TextMessage):
            chunk = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
            self._size += len(chunk)
            if self._size >= self._max:
                raise WebSocketError(f"WebSocket message over the cap ({self._size}+ bytes, cap {self._max})")
            self._parts.append(chunk)
            if not event.message_finished:
                return None
            data, self._parts, self._size = b"".join(self._parts), [], 0
            return WsMessage("text" if isinstance(event, TextMessage) else "binary", data)
        if isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:
                self._writer.write(self._ws.send(event.response()))
            return None
        if isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.OPEN:  # wsproto's report of a framing error, not a close frame
                self._send_close(event.code, event.reason)
                raise WebSocketError(f"WebSocket protocol error from the server: {event.reason}")
            code = 0 if event.code in _NO_CODE else int(event.code)
            self._send_close(code or 1000)
            await self._drain(1.0)
            self._abort()
            return WsMessage("close", code=code, reason=event.reason or "")
        return None  # a pong, or nothing we asked for

    def _send_close(self, code: int, reason: str | None = None) -> None:
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._writer.write(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def _drain(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._writer.drain(), timeout_s)
        except (ConnectionError, TimeoutError):
            pass

    async def close(self, code: int = 1000) -> None:
        """Send our close and end the socket, without waiting for the peer's close frame (the caller has
        what it came for; on a lossy link that wait alone can cost a retransmission timeout)."""
        if self.closed:
            return
        self._send_close(code)
        await self._drain(1.0)
        self._abort()

    def _abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
