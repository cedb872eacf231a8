"""meshctl's start-up stays light, and the operator client's own WebSocket speaks to the daemon's server.

No timing is asserted: what is checked is what a start-up imports (aiohttp, nacl and the trust layer
only when a command needs them), and the WebSocket client against a real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from aiohttp import web

from meshnode.cli import meshctl
from meshnode.config import DEFAULT_ADMIN_PORT, DEFAULT_MESH_PORT
from meshnode.wsclient import WebSocketClient, WebSocketError
from protocol.trust import ROLE_NAMES


def test_the_repeated_constants_match_their_sources() -> None:
    assert meshctl.ROLE_NAMES == ROLE_NAMES
    assert (meshctl.DEFAULT_MESH_PORT, meshctl.DEFAULT_ADMIN_PORT) == (DEFAULT_MESH_PORT, DEFAULT_ADMIN_PORT)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, env=os.environ, check=True, timeout=60)
    return set(out.stdout.split())


def test_help_imports_neither_the_network_client_nor_the_trust_layer() -> None:
    mods = _modules_after("import contextlib\nfrom meshnode.cli.meshctl import main\n"
                          "with contextlib.suppress(SystemExit): main(['policy', 'publish', '--help'])")
    assert "argparse" in mods
    assert not {"aiohttp", "nacl", "protocol.trust", "meshnode.client", "importlib.metadata"} & mods


def test_the_publish_client_does_not_import_aiohttp() -> None:
    mods = _modules_after("import meshnode.client")
    assert "meshnode.wsclient" in mods and "protocol.channel" in mods
    assert "aiohttp" not in mods


def test_every_command_still_resolves() -> None:
    parser = meshctl.build_parser()
    for argv in (["authority", "show", "d"], ["policy", "sign", "p", "--authority", "a", "--out", "o"],
                 ["policy", "verify", "f", "--root", "r"], ["policy", "inspect", "f"], ["policy", "cosign", "f",
                 "--key", "k"], ["node", "enroll", "--authority", "a", "--node-id", "n", "--region", "r",
                 "--role", "x", "--out", "o"], ["authority", "init", "d"], ["authority", "rotate-root", "d"]):
        func = parser.parse_args(argv).func
        name = func.__name__
        assert name.startswith("cmd_")
        module = __import__(f"meshnode.cli.{'authority' if argv[0] in ('authority', 'node') else 'policy'}",
                            fromlist=[name])
        assert callable(getattr(module, name))


async def _server(handler) -> tuple[web.AppRunner, str]:  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_get("/mesh", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"


def test_ws_client_round_trips_small_and_large_messages_and_answers_pings() -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        await ws.ping(b"are you there")
        async for msg in ws:
            await ws.send_bytes(msg.data[::-1])
        return ws

    async def main() -> None:
        runner, node = await _server(echo)
        try:
            ws = await WebSocketClient.connect(node, "/mesh", max_msg_size=1 << 20, connect_timeout_s=5)
            for size in (0, 1, 125, 126, 65535, 65536, 300_000):
                data = os.urandom(size)
                await ws.send_bytes(data)
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert (msg.kind, msg.data) == ("binary", data[::-1])
            await ws.close()
            assert ws.closed
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_ws_client_reports_the_close_code_and_reason_and_refuses_oversize() -> None:
    async def refuse(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.query.get("big"):
            await ws.send_bytes(b"x" * 5000)
        await ws.close(code=4403, message=b"revoked")
        return ws

    async def main() -> None:
        runner, node = await _server(refuse)
        try:
            ws = await WebSocketClient.connect(node, "/mesh", max_msg_size=4096, connect_timeout_s=5)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.kind, msg.code, msg.reason) == ("close", 4403, "revoked")
            assert ws.closed
            ws = await WebSocketClient.connect(node, "/mesh?big=1", max_msg_size=4096, connect_timeout_s=5)
            with pytest.raises(WebSocketError, match="over the cap"):
                await asyncio.wait_for(ws.receive(), 10)
            with pytest.raises(WebSocketError, match="upgrade refused"):
                await WebSocketClient.connect(node, "/nowhere", max_msg_size=4096, connect_timeout_s=5)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_ws_client_takes_text_and_a_message_just_under_the_cap_and_refuses_one_over_it_across_reads() -> None:
    cap = 256 * 1024

    async def send(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("héllo")
        await ws.send_bytes(b"u" * (cap - 1))
        await ws.send_bytes(b"o" * (4 * cap))  # several socket reads: refused as the cap is crossed
        await ws.receive()
        return ws

    async def main() -> None:
        runner, node = await _server(send)
        try:
            ws = await WebSocketClient.connect(node, "/mesh", max_msg_size=cap, connect_timeout_s=5)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.kind, msg.data) == ("text", "héllo".encode())
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.kind, len(msg.data)) == ("binary", cap - 1)
            with pytest.raises(WebSocketError, match="over the cap"):
                await asyncio.wait_for(ws.receive(), 10)
            assert ws.closed
            with pytest.raises(WebSocketError, match="closed WebSocket"):
                await ws.send_bytes(b"late")
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_ws_client_refuses_a_wrong_accept_key_and_an_early_end_with_a_clear_reason() -> None:
    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            if port_of["wrong"] == writer.get_extra_info("sockname")[1]:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")
                await writer.drain()
            writer.close()

        wrong = await asyncio.start_server(answer, "127.0.0.1", 0)
        early = await asyncio.start_server(answer, "127.0.0.1", 0)
        port_of = {"wrong": wrong.sockets[0].getsockname()[1]}
        try:
            with pytest.raises(WebSocketError, match="bad WebSocket upgrade response: .*accept"):
                await WebSocketClient.connect(f"127.0.0.1:{port_of['wrong']}", "/mesh", max_msg_size=4096,
                                              connect_timeout_s=5)
            with pytest.raises(WebSocketError, match="closed during the WebSocket upgrade"):
                await WebSocketClient.connect(f"127.0.0.1:{early.sockets[0].getsockname()[1]}", "/mesh",
                                              max_msg_size=4096, connect_timeout_s=5)
        finally:
            wrong.close()
            early.close()

    asyncio.run(main())
