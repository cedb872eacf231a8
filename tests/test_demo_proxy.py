"""The demo's userspace proxy (meshnode/demo_proxy.py) over real loopback sockets: it forwards both
ways, and shutting down while a connection is being forwarded ends the handler quietly (on Python
3.11 a handler that ends cancelled makes asyncio print a traceback, which failed a demo test)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshnode.demo_proxy import DemoNode, Proxy


def _node(tmp_path: Path, index: int, region: str, mesh_port: int) -> DemoNode:
    return DemoNode(index, f"n{index}", region, "127.0.0.1", mesh_port, 0, 0, tmp_path)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _scenario(tmp_path: Path) -> None:
    upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    node = _node(tmp_path, 1, "region-a", port)
    probe = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    node.proxy_port = probe.sockets[0].getsockname()[1]  # a free port for the proxy
    probe.close()
    await probe.wait_closed()
    proxy = Proxy([node])
    await proxy.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", node.proxy_port)
        w.write(b"hello")
        assert await asyncio.wait_for(r.readexactly(5), 10) == b"hello"  # forwarded both ways
        handlers = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Proxy._handle"]
        assert len(handlers) == 1 and len(proxy.pipes) == 1
        handlers[0].cancel()  # what the loop's shutdown does to a connection still being forwarded
        await asyncio.wait(handlers, timeout=10)
        assert handlers[0].done() and not handlers[0].cancelled() and handlers[0].exception() is None
        assert not proxy.pipes
        assert await asyncio.wait_for(r.read(), 10) == b""  # the client's connection was closed
        w.close()
    finally:
        proxy.close()
        upstream.close()


def test_proxy_forwards_and_a_shutdown_mid_connection_ends_the_handler_quietly(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))
