"""Event-driven drift detection for the nftables backend: ``nft monitor`` as a child process, and a drift
check at once when another tool touches our table or flushes the ruleset (Debian's ``nftables.service``
reload does ``flush ruleset``), instead of leaving the host open until the next drift timer.

``nft monitor`` prints one line per change, e.g. ``delete table inet policymesh`` or ``add rule inet
policymesh input tcp dport 22 accept``; a flush of the ruleset shows as the deletion of every chain and
table (older versions print ``flush ruleset``). One replacement of our table is a burst of lines (one per
set, element and rule): the burst is one change, checked once when the monitor has been quiet for
``SETTLE_S`` (or ``SETTLE_MAX_S`` after its first line, however long it goes on).  Our own applies show up
too: the drift check after them finds nothing.  The monitor is restarted with backoff when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
SETTLE_S = 0.1  # a flush or a load is a burst of lines: check once the monitor was quiet this long
SETTLE_MAX_S = 1.0  # ... or this long after the burst's first line
READ_CHUNK = 65536
VERBS = frozenset({"add", "insert", "replace", "delete", "destroy", "flush", "reset"})


def touches_table(line: str, table: str) -> bool:
    """Whether one ``nft monitor`` line changes ``table`` (any family) or the whole ruleset."""
    words = line.split()
    if words[:2] == ["flush", "ruleset"]:
        return True
    return len(words) >= 4 and words[0] in VERBS and words[3] == table


class RulesetWatch:
    """Runs ``nft monitor`` for the daemon's lifetime and calls ``on_change()`` when our table changed."""

    def __init__(self, table: str, on_change: Callable[[], None], log: Any,
                 command: tuple[str, ...] = ("nft", "monitor")) -> None:
        self.table = table
        self.on_change = on_change
        self.log = log.bind(component="ruleset_watch")
        self.command = command
        self.changes_seen = 0

    async def run(self) -> None:
        backoff_s = RESTART_MIN_S
        while True:
            lines = await self._watch_once()
            if lines:
                backoff_s = RESTART_MIN_S  # it ran: the next death is a new episode
            await asyncio.sleep(backoff_s)
            backoff_s = min(RESTART_MAX_S, backoff_s * 2)

    async def _watch_once(self) -> int:
        """One ``nft monitor`` process until it exits; the number of lines it printed."""
        try:
            proc = await asyncio.create_subprocess_exec(*self.command, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            self.log.error("ruleset_watch.start_failed", error=exc.strerror or str(exc))
            return 0
        self.log.info("ruleset_watch.started", pid=proc.pid, table=self.table)
        lines = 0
        loop = asyncio.get_running_loop()
        burst_since: float | None = None  # first line of a burst that touched our table, not yet checked
        partial = b""  # a line not complete yet
        try:
            assert proc.stdout is not None
            while True:
                # What the monitor printed so far, whole (a load of our table is a burst of ~100 lines:
                # read as a few chunks, not a wake-up per line, while the host is busy applying).
                if burst_since is None:
                    raw = await proc.stdout.read(READ_CHUNK)
                else:
                    wait_s = min(SETTLE_S, burst_since + SETTLE_MAX_S - loop.time())
                    try:
                        async with asyncio.timeout(max(0.0, wait_s)):
                            raw = await proc.stdout.read(READ_CHUNK)
                    except TimeoutError:  # quiet (or long enough): one check for the whole burst
                        burst_since = None
                        self.on_change()
                        continue
                if not raw:
                    break
                *complete, partial = (partial + raw).split(b"\n")
                for line in complete:
                    lines += 1
                    if touches_table(line.decode(errors="replace"), self.table):
                        self.changes_seen += 1
                        if burst_since is None:
                            burst_since = loop.time()
            if burst_since is not None:
                self.on_change()
            stderr = await proc.stderr.read() if proc.stderr is not None else b""
            rc = await proc.wait()
            self.log.warning("ruleset_watch.exited", rc=rc, error=stderr.decode(errors="replace")[:300],
                             note="restarting; the drift timer still runs")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(proc.wait())
        return lines
