"""Authenticated peer connections: one WebSocket per connection, one Noise frame per binary message.

The shell side of protocol/channel/session.py: it moves frames between the socket and a SecureSession, bounds
what a peer may cost (frame size cap, handshake deadline, bounded send queue), and reports sessions to
the daemon. A peer's bad input closes that peer's connection, never the node.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from protocol.channel import (
    ConnectionKind,
    HandshakeComplete,
    MessageReceived,
    PeerClosed,
    SecureSession,
    SessionState,
)
from protocol.channel.noise import MAX_MESSAGE_LEN
from protocol.errors import MeshError, TrustError

from .wsclient import MESH_PATH as MESH_PATH  # re-exported: the daemon's listener and dialer
from .wsclient import REFUSED_CLOSE_CODE

MAX_FRAME_BYTES = MAX_MESSAGE_LEN
"""The largest frame on the wire: one Noise message (the channel fills frames exactly up to it)."""
WS_MAX_MSG_BYTES = MAX_FRAME_BYTES + 1
"""aiohttp's ``max_msg_size`` for every mesh WebSocket. aiohttp refuses a message whose length is
*at least* ``max_msg_size`` (3.9-3.14: ``payload >= max_msg_size - partial``), so the cap is one above
the largest Noise frame; tests/test_transport_caps.py pins this against the installed aiohttp."""
SEND_QUEUE_MESSAGES = 1024
_conn_ids = itertools.count(1)


class TransportError(MeshError):
    """The socket failed or the peer broke the framing (shell only)."""


class OversizeFrameError(TransportError):
    """The peer sent a WebSocket message larger than any Noise frame (the socket refused it, code 1009)."""


def _ws_error(msg: aiohttp.WSMessage) -> TransportError:
    """The error aiohttp reports for a broken or refused WebSocket message, as a TransportError."""
    exc = msg.data
    if getattr(exc, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
        return OversizeFrameError(f"frame over the {MAX_FRAME_BYTES}-byte cap: {exc}")
    return TransportError(f"websocket error: {exc}")


class HandshakeRefusedError(TransportError):
    """The peer refused our handshake and said why (e.g. our certificate is revoked or expired)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def refusal_reason(exc: BaseException) -> str:
    """A stable label for metrics: the TrustError reason or the exception class in snake case."""
    if isinstance(exc, TrustError):
        return exc.reason
    if isinstance(exc, HandshakeRefusedError):
        return "refused_by_peer"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_").removesuffix("_error")


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(eq=False)
class Conn:
    ws: WebSocket
    session: SecureSession
    inbound: bool
    address: str
    id: int = field(default_factory=lambda: next(_conn_ids))
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(SEND_QUEUE_MESSAGES))
    closed: bool = False
    retired: bool = False  # being closed to make room (channel limit per identity)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def peer(self) -> str:
        cert = self.session.peer
        return cert.node_id if cert else ""

    @property
    def kind(self) -> ConnectionKind | None:
        return self.session.kind

    def enqueue(self, data: bytes) -> bool:
        """Queue an application message; False when the peer is too slow (the caller drops it)."""
        if self.closed:
            return False
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            return False
        return True


async def send_frames(conn: Conn, frames: list[bytes], on_bytes: Callable[[str, int], None]) -> None:
    for f in frames:
        await conn.ws.send_bytes(f)
        conn.bytes_out += len(f)
        on_bytes("out", len(f))


async def handshake(conn: Conn, on_bytes: Callable[[str, int], None]) -> None:
    """Run the Noise XX handshake to completion or raise (timeout, trust failure, broken socket)."""
    session = conn.session
    await send_frames(conn, session.frames_to_send(), on_bytes)
    while session.state is SessionState.HANDSHAKE:
        deadline = session.deadline()
        remaining = 0.001 if deadline is None else max(0.001, (deadline - now_ms()) / 1000)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation into a timeout.
            async with asyncio.timeout(remaining):
                msg = await conn.ws.receive()
        except TimeoutError:
            session.handle_timer(now_ms() + 1_000_000)  # raises HandshakeTimeoutError
            raise
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise _ws_error(msg)
        if msg.type == aiohttp.WSMsgType.CLOSE and msg.data == REFUSED_CLOSE_CODE:
            raise HandshakeRefusedError(f"the peer refused our handshake: {msg.extra or 'no reason given'}",
                                        str(msg.extra or "refused"))
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise TransportError(f"connection closed during the handshake ({msg.type.name.lower()})")
        conn.bytes_in += len(msg.data)
        on_bytes("in", len(msg.data))
        events = session.receive_frame(msg.data, now_ms(), time.time())
        await send_frames(conn, session.frames_to_send(), on_bytes)
        if any(isinstance(e, HandshakeComplete) for e in events):
            break


async def writer(conn: Conn, on_bytes: Callable[[str, int], None]) -> None:
    """Drain the connection's queue: encrypt each message (chunked) and send its frames in order."""
    while True:
        data = await conn.queue.get()
        if data is None or conn.closed:
            return
        frames = conn.session.send_message(data)
        await send_frames(conn, frames, on_bytes)


async def reader(
    conn: Conn,
    on_message: Callable[[Conn, bytes], Awaitable[None]],
    on_bytes: Callable[[str, int], None],
) -> str:
    """Feed received frames to the session until the peer closes; returns why it ended."""
    while True:
        msg = await conn.ws.receive()
        if msg.type != aiohttp.WSMsgType.BINARY:
            if msg.type == aiohttp.WSMsgType.TEXT:
                raise TransportError("text frame on the mesh channel")
            if msg.type == aiohttp.WSMsgType.ERROR:
                raise _ws_error(msg)  # e.g. an oversize frame: count and log it, not a quiet close
            if msg.type == aiohttp.WSMsgType.CLOSE and msg.data == REFUSED_CLOSE_CODE:
                # The initiator's handshake ends at message 3; the responder's verdict on our
                # certificate arrives here, as the first thing after it.
                raise HandshakeRefusedError(f"the peer refused our handshake: {msg.extra or 'no reason given'}",
                                            str(msg.extra or "refused"))
            break
        conn.bytes_in += len(msg.data)
        on_bytes("in", len(msg.data))
        for ev in conn.session.receive_frame(msg.data, now_ms(), time.time()):
            if isinstance(ev, MessageReceived):
                await on_message(conn, ev.data)
            elif isinstance(ev, PeerClosed):
                return f"peer closed: {ev.reason}" if getattr(ev, "reason", "") else "peer closed"
    return "socket closed"




async def close(conn: Conn, reason: str, *, refused: bool = False) -> None:
    """End a connection. ``refused``: tell a peer whose handshake we refused why, in the WebSocket close
    (a stable reason label such as ``revoked`` or ``expired``, nothing secret), so its operator can see it."""
    if conn.closed:
        return
    conn.closed = True
    try:
        conn.queue.put_nowait(None)
    except asyncio.QueueFull:
        pass
    try:
        frames = conn.session.close(reason[:200]) if conn.session.state is SessionState.OPEN else []
        for f in frames:
            await asyncio.wait_for(conn.ws.send_bytes(f), 1.0)
    except (TimeoutError, MeshError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass
    try:
        if refused:
            await asyncio.wait_for(conn.ws.close(code=REFUSED_CLOSE_CODE, message=reason[:100].encode()), 2.0)
        else:
            await asyncio.wait_for(conn.ws.close(), 2.0)
    except (TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass


def entropy(n: int) -> bytes:
    return os.urandom(n)


# -- before authentication ----------------------------------------------------------------------------


class PreauthGuard:
    """Bounds what an unauthenticated connection may cost: every accepted TCP connection must finish its
    HTTP upgrade and Noise handshake within `deadline_s` of the accept (an idle socket, a slowloris
    header, an open WebSocket with no handshake all end there), and at most `per_source` of them per
    remote address and `total` overall may be pending at once; the next one is aborted at accept.

    The shell reports each connection's accept and loss (`accepted` / `lost`, from `GuardedServer`) and
    its successful handshake (`authenticated`); `on_refuse(source, reason)` counts and logs each refusal
    (reason ``preauth_limit`` or ``preauth_timeout``). Memory: one entry per pending connection, at most
    `total`.
    """

    def __init__(self, *, deadline_s: float, per_source: int, total: int,
                 on_refuse: Callable[[str, str], None]) -> None:
        if deadline_s <= 0 or per_source < 1 or total < 1:
            raise ValueError("deadline_s, per_source and total must be positive")
        self.deadline_s = deadline_s
        self.per_source = per_source
        self.total = total
        self._on_refuse = on_refuse
        self._pending: dict[object, tuple[str, asyncio.BaseTransport, asyncio.TimerHandle]] = {}
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def accepted(self, conn: object, tr: asyncio.BaseTransport) -> bool:
        """A TCP connection was accepted; False (and the socket is aborted) when over a cap."""
        peer = tr.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if len(self._pending) >= self.total or self._per_source.get(source, 0) >= self.per_source:
            self._on_refuse(source, "preauth_limit")
            _abort(tr)
            return False
        handle = asyncio.get_running_loop().call_later(self.deadline_s, self._expire, conn)
        self._pending[conn] = (source, tr, handle)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return True

    def authenticated(self, conn: object) -> None:
        """The connection completed its handshake: no deadline and no pre-auth slot any more."""
        self._release(conn)

    def lost(self, conn: object) -> None:
        self._release(conn)

    def _expire(self, conn: object) -> None:
        entry = self._release(conn)
        if entry is not None:
            self._on_refuse(entry[0], "preauth_timeout")
            _abort(entry[1])

    def _release(self, conn: object) -> tuple[str, asyncio.BaseTransport, asyncio.TimerHandle] | None:
        entry = self._pending.pop(conn, None)
        if entry is None:
            return None
        source, _, handle = entry
        handle.cancel()
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]
        return entry


def _abort(tr: asyncio.BaseTransport) -> None:
    abort = getattr(tr, "abort", None)
    if abort is not None:
        abort()
    else:
        tr.close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, reporting every accepted and lost connection to a PreauthGuard
    (``connection_made`` / ``connection_lost`` are the hooks each RequestHandler calls on its server)."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 guard: PreauthGuard, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.guard = guard

    def connection_made(self, handler: object, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(handler, transport)  # type: ignore[arg-type]
        self.guard.accepted(handler, transport)

    def connection_lost(self, handler: object, exc: BaseException | None = None) -> None:  # type: ignore[override]
        self.guard.lost(handler)
        super().connection_lost(handler, exc)  # type: ignore[arg-type]
