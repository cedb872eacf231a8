"""The demo's nodes and the userspace proxy between them that cuts a region off (and heals it) without root.

Each node's advertised mesh address is a proxy port that forwards to the node, and each node dials from
its own loopback address, so the proxy knows both ends of every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class DemoNode:
    index: int
    node_id: str
    region: str
    ip: str
    mesh_port: int  # the daemon's own listener
    proxy_port: int  # the advertised address (the demo's proxy)
    admin_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None

    @property
    def advertise(self) -> str:
        return f"{self.ip}:{self.proxy_port}"

    @property
    def direct(self) -> str:
        return f"{self.ip}:{self.mesh_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Proxy:
    """Forwards each node's advertised port to the node; drops connections across a cut."""

    nodes: list[DemoNode]
    region_of_ip: dict[str, str] = field(default_factory=dict)
    cut_regions: set[str] = field(default_factory=set)
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    pipes: set[tuple[str, str, asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)

    def blocked(self, src_ip: str, dst_region: str) -> bool:
        src_region = self.region_of_ip.get(src_ip)
        if src_region is None or not self.cut_regions:
            return False
        return (src_region in self.cut_regions) != (dst_region in self.cut_regions)

    async def start(self) -> None:
        for n in self.nodes:
            self.region_of_ip[n.ip] = n.region
            server = await asyncio.start_server(functools.partial(self._handle, n), n.ip, n.proxy_port)
            self.servers.append(server)

    async def _handle(self, node: DemoNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(node, reader, writer)
        except asyncio.CancelledError:
            # The demo is shutting down (a connection accepted as the loop closes).  Return, do not
            # re-raise: on Python 3.11 the server's done-callback calls task.exception(), which raises
            # on a cancelled task and prints a traceback (fixed in 3.12).
            writer.transport.abort()

    async def _forward(self, node: DemoNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        src_ip = writer.get_extra_info("peername")[0]
        if self.blocked(src_ip, node.region):
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(node.ip, node.mesh_port)
        except OSError:
            writer.close()
            return
        entry = (src_ip, node.region, writer, up_w)
        self.pipes.add(entry)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(OSError, RuntimeError):
                w.close()

        try:
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        except asyncio.CancelledError:
            up_w.transport.abort()
            raise
        finally:
            self.pipes.discard(entry)

    def cut(self, regions: set[str]) -> None:
        self.cut_regions = set(regions)
        for src_ip, dst_region, w1, w2 in list(self.pipes):
            if self.blocked(src_ip, dst_region):
                w1.transport.abort()
                w2.transport.abort()

    def heal(self) -> None:
        self.cut_regions = set()

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for _, _, w1, w2 in list(self.pipes):
            w1.transport.abort()
            w2.transport.abort()
