"""Policy sources against real HTTP servers and real directories."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from meshnode.config import load_config, render_config
from meshnode.sources import DropDirSource, UrlSource, drop_file
from protocol.gossip import PolicyResult, Verdict
from protocol.trust import TrustedState
from simulations.identities import make_authority
from tests.fixtures import sign_sample


def make_lc(tmp_path: Path, urls: list[str] | None = None, drop_dir: str = "incoming"):
    text = render_config(cluster="test", node_id="n1", region="r1", listen="127.0.0.1:7946",
                         advertise="127.0.0.1:7946", seeds=[], admin_listen="127.0.0.1:9946")
    text = text.replace('drop_dir = ""', f'drop_dir = "{drop_dir}"')
    if urls:
        text = text.replace("urls = []", "urls = [" + ", ".join(f'"{u}"' for u in urls) + "]")
    p = tmp_path / "node.toml"
    p.write_text(text)
    return load_config(p)


class Verifier:
    """A real TrustedState behind the submit callback, like the daemon's core."""

    def __init__(self) -> None:
        self.auth = make_authority()
        self.trust = TrustedState(self.auth.root_bytes)
        self.calls: list[tuple[str, bool]] = []

    def submit(self, data: bytes, source: str, roots) -> PolicyResult:
        import time

        from protocol.errors import TrustError

        try:
            check = self.trust.accept_policy(data, time.time())
        except TrustError as exc:
            self.calls.append((source, False))
            return PolicyResult(source, False, 0, Verdict.of(exc.reason), str(exc))
        self.calls.append((source, True))
        return PolicyResult(source, True, check.policy.serial,
                            Verdict.DUPLICATE if check.duplicate else Verdict.ACCEPTED)


def test_drop_dir(tmp_path):
    import time

    v = Verifier()
    lc = make_lc(tmp_path)
    src = DropDirSource(lc, v.submit, structlog.get_logger())
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    drop_file(incoming, "good.msgpack", sign_sample(v.auth, 3, now=int(time.time())))
    drop_file(incoming, "junk.bin", b"\x00garbage")
    assert src.scan_once() == 2
    assert v.trust.serial == 3
    assert (incoming / "accepted" / "good.msgpack").exists()
    assert (incoming / "rejected" / "junk.bin").exists()
    assert "malformed" in (incoming / "rejected" / "junk.bin.reason").read_text()
    assert src.scan_once() == 0  # processed files are never retried


def test_url_poll_with_etag_and_failures(tmp_path):
    import time

    v = Verifier()
    body = sign_sample(v.auth, 7, now=int(time.time()))
    hits = {"200": 0, "304": 0}

    async def policy(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v7"':
            hits["304"] += 1
            return web.Response(status=304)
        hits["200"] += 1
        return web.Response(body=body, headers={"ETag": '"v7"'})

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/policy", policy)
        app.router.add_get("/broken", broken)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        urls = [f"http://127.0.0.1:{port}/policy", f"http://127.0.0.1:{port}/broken"]
        lc = make_lc(tmp_path, urls=urls)
        async with aiohttp.ClientSession() as http:
            src = UrlSource(lc, http, v.submit, structlog.get_logger())
            for _ in range(3):
                for u in urls:
                    await src.poll(u)
            assert src.failures[urls[1]] == 3 and src.failures[urls[0]] == 0
        await runner.cleanup()

    asyncio.run(main())
    assert v.trust.serial == 7
    assert hits == {"200": 1, "304": 2}
