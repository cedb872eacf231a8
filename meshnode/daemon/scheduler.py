"""Every timer-driven job of the daemon, run from one loop.

A job says when it is next due (``time.monotonic()`` seconds, or None for "not now") and runs when that
time has passed. The loop sleeps until the earliest due time or until :meth:`Scheduler.wake` (called
after every input to the core, whose deadline may have moved), then runs every job that is due, in the
order they were added.  It keeps one loop timer for the earliest due time and re-arms it only when that
time moves (a wake happens after every message: it must cost little). The enforcer's own worker and drift check are not jobs here: they are tasks of
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
        # The one timer armed for the earliest due time: (that time, its handle); re-armed only when the
        # earliest due time moves.  A wake after every input to the core is the common case: it costs
        # re-reading the due times, not a new timer and a cancellation each time.
        self._armed: tuple[float, asyncio.TimerHandle] | None = None

    def add(self, job: Job) -> None:
        self._jobs.append(job)

    def wake(self) -> None:
        """Re-read every job's due time now (an input may have moved the core's deadline)."""
        self._wake.set()

    def next_due(self) -> float | None:
        """The earliest due time of the jobs (``time.monotonic()`` seconds), None when nothing is due."""
        earliest: float | None = None
        for job in self._jobs:
            due = job.next_due()
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    def _fire(self) -> None:
        self._armed = None
        self._wake.set()

    def _arm(self, due: float | None, now: float) -> None:
        armed = self._armed
        if armed is not None:
            if armed[0] == due:
                return
            armed[1].cancel()
            self._armed = None
        if due is not None:
            loop = asyncio.get_running_loop()
            self._armed = (due, loop.call_at(loop.time() + (due - now), self._fire))

    def _run_due(self, now: float) -> None:
        for job in self._jobs:
            due = job.next_due()
            if due is not None and due <= now:
                job.run()

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                due = self.next_due()
                if due is not None and due <= now:
                    self._run_due(now)
                    await asyncio.sleep(0)  # what the jobs started (and other tasks) run before the next round
                    continue
                self._arm(due, now)
                await self._wake.wait()
        finally:
            if self._armed is not None:
                self._armed[1].cancel()
                self._armed = None


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
