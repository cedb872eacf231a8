"""The transport's caps agree with the channel's: pinned against the installed aiohttp on a real loopback
WebSocket pair, so an aiohttp upgrade that changes how `max_msg_size` compares cannot silently break
every message over one Noise frame (the 1,200-rule policy that once failed with 1009)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from meshnode import transport
from protocol.channel import CHUNK_BYTES, ConnectionKind
from protocol.channel.noise import MAX_MESSAGE_LEN
from protocol.gossip import wire as gossip_wire
from protocol.trust import MAX_ENVELOPE_BYTES

pytestmark = pytest.mark.timeout(60)


async def _echo_sizes(sizes: list[int]) -> list[tuple[str, int]]:
    """Send one binary WebSocket message of each size from a client to a server, both with the
    transport's caps; returns what the server saw for each (("binary", n) or ("error", close code))."""
    seen: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=transport.WS_MAX_MSG_BYTES)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                seen.append(("binary", len(msg.data)))
                await ws.send_bytes(b"ok")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                seen.append(("error", int(getattr(msg.data, "code", 0))))
        done.set()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for size in sizes:
            done.clear()
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"http://127.0.0.1:{port}/",
                                           max_msg_size=transport.WS_MAX_MSG_BYTES) as ws:
                    await ws.send_bytes(b"\xa5" * size)
                    reply = await asyncio.wait_for(ws.receive(), 10)
                    if reply.type == aiohttp.WSMsgType.BINARY:
                        await ws.close()
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await runner.cleanup()
    return seen


def test_a_maximum_size_noise_frame_crosses_a_real_aiohttp_websocket() -> None:
    assert transport.MAX_FRAME_BYTES == MAX_MESSAGE_LEN
    seen = asyncio.run(_echo_sizes([MAX_MESSAGE_LEN, MAX_MESSAGE_LEN + 1]))
    assert seen[0] == ("binary", MAX_MESSAGE_LEN), seen
    # One byte more than any Noise frame is refused by the socket (1009), so the cap still bounds a peer.
    assert seen[1] == ("error", aiohttp.WSCloseCode.MESSAGE_TOO_BIG), seen


def test_the_channel_caps_fit_every_gossip_message_and_a_maximum_policy() -> None:
    from meshnode.daemon import OPERATOR_REQUEST_BYTES, channel_message_caps

    caps = channel_message_caps()
    # A node must accept any gossip message a peer may legitimately send, and reassemble no more.
    assert caps[ConnectionKind.GOSSIP] == gossip_wire.MAX_MESSAGE_BYTES
    # A policy envelope at its cap, with framing, fits one gossip message and one operator request.
    assert MAX_ENVELOPE_BYTES + 4096 <= gossip_wire.MAX_MESSAGE_BYTES
    assert caps[ConnectionKind.OPERATOR] == OPERATOR_REQUEST_BYTES >= MAX_ENVELOPE_BYTES + 4096
    # The chunking fills frames exactly up to the Noise maximum.
    assert CHUNK_BYTES + 1 + 16 == transport.MAX_FRAME_BYTES
