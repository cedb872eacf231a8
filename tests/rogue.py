"""A rogue *enrolled* peer for attack tests against real daemons.

`RoguePeer` holds a validly enrolled node identity (enrolled with the Cluster's authority through
`meshctl node enroll`, so every handshake succeeds) and opens real Noise sessions to a daemon's mesh
port. On an open `RogueChannel` it speaks the gossip wire protocol (`protocol.gossip.wire.encode`) or
anything else: valid-format floods, oversize messages, replays. It never runs a daemon; everything it
sends is chosen by the test. Pre-authentication attacks (slowloris, idle sockets) need no identity and
live in `slowloris`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

from protocol.channel import SecureSession
from tests.daemon_helpers import Cluster, NodeProc, meshctl, open_session


@dataclass(eq=False)
class RogueChannel:
    """One authenticated gossip channel from the rogue to a node."""

    ws: aiohttp.ClientWebSocketResponse
    session: SecureSession
    http: aiohttp.ClientSession
    drain: asyncio.Task[None] | None = None
    ended: bool = False

    async def send(self, message: bytes | msgspec.Struct) -> bool:
        """Send one application message (a gossip wire struct is encoded first); False once the node
        has closed the channel."""
        data = message if isinstance(message, bytes) else msgspec.msgpack.encode(message)
        if self.ended or self.ws.closed:
            return False
        try:
            for frame in self.session.send_message(data):
                await self.ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            self.ended = True
            return False
        return True

    def start_draining(self) -> None:
        """Read (and discard) what the node sends, so its send queue never fills; notes the close."""

        async def drain() -> None:
            with contextlib.suppress(Exception):
                async for _ in self.ws:
                    pass
            self.ended = True

        self.drain = asyncio.get_running_loop().create_task(drain())

    async def wait_closed(self, timeout_s: float) -> bool:
        """True if the node closes the channel within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ended or self.ws.closed:
                return True
            await asyncio.sleep(0.05)
        return self.ended or self.ws.closed

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)
        if self.drain is not None:
            self.drain.cancel()
            with contextlib.suppress(BaseException):
                await self.drain
        await self.http.close()


class RoguePeer:
    """A node identity enrolled with the cluster's authority, driven by the test."""

    def __init__(self, cluster: Cluster, node_id: str = "rogue-1", *, region: str = "region-a",
                 role: str = "app", address: str | None = None) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.dir: Path = cluster.root / node_id
        meshctl("node", "enroll", "--authority", cluster.authority, "--node-id", node_id, "--region", region,
                "--role", role, "--address", address or f"127.66.{cluster.subnet}.200", "--out", self.dir,
                "--backend", "file", "--valid", "1d", *cluster.key_args("enroll"))

    async def connect(self, target: NodeProc, *, drain: bool = True) -> RogueChannel:
        ws, session, http = await open_session(target.mesh, self.dir)
        ch = RogueChannel(ws, session, http)
        if drain:
            ch.start_draining()
        return ch


def slowloris(target: NodeProc, sources: list[str], per_source: int) -> list[socket.socket]:
    """Open `per_source` connections from each source address, each sending an HTTP header that never
    ends; connections the node refuses at once are closed and left out."""
    out = []
    for src in sources:
        for _ in range(per_source):
            try:
                s = socket.create_connection((target.ip, target.mesh_port), timeout=2, source_address=(src, 0))
                s.sendall(b"GET /mesh HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                continue
            s.setblocking(False)
            out.append(s)
    return out
