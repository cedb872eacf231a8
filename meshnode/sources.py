"""Local policy sources: a watched drop directory (air-gapped hosts) and plain HTTP(S) URLs.

Both hand exact envelope bytes to the daemon, which verifies them like any other input: the envelope
is self-authenticating, so any static host or removable disk will do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from protocol.gossip import PolicyResult, Verdict
from protocol.trust import MAX_ENVELOPE_BYTES

from .config import LoadedConfig
from .fsutil import atomic_write

Submit = Callable[[bytes, str, Sequence[bytes]], PolicyResult]
MAX_BACKOFF_FACTOR = 16


class DropDirSource:
    """Every regular file placed in ``drop_dir`` is submitted once, then moved to ``accepted/`` or
    ``rejected/`` (with a ``.reason`` file next to it), so nothing is lost or retried forever."""

    def __init__(self, config: LoadedConfig, submit: Submit, log: Any) -> None:
        self.submit = submit
        self.log = log.bind(source="drop_dir")
        self.reconfigure(config)

    def reconfigure(self, config: LoadedConfig) -> None:
        self.dir = config.resolve(config.cfg.sources.drop_dir)
        self.interval = config.cfg.sources.drop_poll_s

    def scan_once(self) -> int:
        if not self.dir.is_dir():
            return 0
        n = 0
        for path in sorted(self.dir.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            n += 1
            try:
                size = path.stat().st_size
                data = path.read_bytes() if size <= MAX_ENVELOPE_BYTES else None
            except OSError as exc:
                self.log.warning("source.unreadable", file=str(path), reason=exc.strerror or str(exc))
                continue
            if data is None:
                result = PolicyResult(f"drop:{path.name}", False, 0, Verdict.TOO_LARGE, f"file is {size} bytes, over the cap")
            else:
                result = self.submit(data, f"drop:{path.name}", ())
            dest = self.dir / ("accepted" if result.accepted else "rejected")
            dest.mkdir(exist_ok=True)
            target = dest / path.name
            path.replace(target)
            if not result.accepted:
                atomic_write(dest / (path.name + ".reason"), (result.text + "\n").encode())
            self.log.info("source.drop_processed", file=path.name, accepted=result.accepted,
                          serial=result.serial, reason=result.text)
        return n

    async def run(self) -> None:
        while True:
            self.scan_once()
            await asyncio.sleep(self.interval)


class UrlSource:
    """Poll URLs serving signed policy envelopes, with ETag revalidation and backoff on failure."""

    def __init__(self, config: LoadedConfig, http: aiohttp.ClientSession, submit: Submit, log: Any) -> None:
        self.http = http
        self.submit = submit
        self.log = log.bind(source="url")
        self.etags: dict[str, str] = {}
        self.failures: dict[str, int] = {}
        self.reconfigure(config)

    def reconfigure(self, config: LoadedConfig) -> None:
        self.urls = list(config.cfg.sources.urls)
        self.interval = config.cfg.sources.poll_s

    async def poll(self, url: str) -> None:
        headers = {"If-None-Match": self.etags[url]} if url in self.etags else {}
        try:
            async with self.http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as resp:
                if resp.status == 304:
                    self.failures[url] = 0
                    return
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message=resp.reason or "")
                if (resp.content_length or 0) > MAX_ENVELOPE_BYTES:
                    raise ValueError(f"body of {resp.content_length} bytes is over the cap")
                data = await resp.content.read(MAX_ENVELOPE_BYTES + 1)
                if len(data) > MAX_ENVELOPE_BYTES:
                    raise ValueError("body over the cap")
                etag = resp.headers.get("ETag")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            self.failures[url] = self.failures.get(url, 0) + 1
            self.log.warning("source.url_failed", url=url, failures=self.failures[url], reason=str(exc) or type(exc).__name__)
            return
        self.failures[url] = 0
        result = self.submit(data, f"url:{url}", ())
        if etag:
            self.etags[url] = etag
        if not result.accepted and result.reason is not Verdict.DUPLICATE:
            self.log.warning("source.url_refused", url=url, reason=result.text)

    async def run(self) -> None:
        while True:
            for url in self.urls:
                await self.poll(url)
            worst = max((self.failures.get(u, 0) for u in self.urls), default=0)
            await asyncio.sleep(self.interval * min(MAX_BACKOFF_FACTOR, 2 ** min(worst, 4)))


def drop_file(directory: Path, name: str, data: bytes) -> Path:
    """Place a file in a drop directory atomically (so the watcher never reads half a file)."""
    path = Path(directory) / name
    atomic_write(path, data)
    return path
