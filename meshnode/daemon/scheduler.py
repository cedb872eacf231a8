"""Every timer-driven job of the daemon, run from one loop.

A job says when it is next due (``time.monotonic()`` seconds, or None for "not now") and runs when that
time has passed. The loop sleeps until the earliest due time or until :meth:`Scheduler.wake` (called
after every input to the core, whose deadline may have moved), then runs every job that is due, in the
order they were added. The enforcer's own worker and drift check are not jobs here: they are tasks of
the enforcer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Job(Protocol):
    name: str

    def next_due(self) -> float | None: ...

    def run(self) -> None: ...


class Scheduler:
    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()

    def add(self, job: Job) -> None:
        self._jobs.append(job)

    def wake(self) -> None:
        """Re-read every job's due time now (an input may have moved the core's deadline)."""
        self._wake.set()

    def _timeout_s(self, now: float) -> float | None:
        due = [d for d in (job.next_due() for job in self._jobs) if d is not None]
        return max(0.0, min(due) - now) if due else None

    async def run(self) -> None:
        while True:
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for turns a cancellation that races the
            # deadline into TimeoutError, and the loop would then run jobs during shutdown.
            try:
                async with asyncio.timeout(self._timeout_s(time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                now = time.monotonic()
                for job in self._jobs:
                    due = job.next_due()
                    if due is not None and due <= now:
                        job.run()


class Deadline:
    """A job whose due time someone else keeps (the core's next timer, the next state-write retry)."""

    def __init__(self, name: str, due: Callable[[], float | None], run: Callable[[], None]) -> None:
        self.name = name
        self._due = due
        self._run = run

    def next_due(self) -> float | None:
        return self._due()

    def run(self) -> None:
        self._run()


class Every:
    """A job that runs every ``interval_s``; its work may return a different next interval (a backoff)."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], float | None]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._work = work
        self._due = time.monotonic() + interval_s

    def next_due(self) -> float | None:
        return self._due

    def run(self) -> None:
        interval = self._work()
        self._due = time.monotonic() + (self.interval_s if interval is None else interval)
