"""The daemon's one scheduler: due jobs run in order, a wake re-reads due times, intervals can back off."""

from __future__ import annotations

import asyncio
import time

from meshnode.daemon.scheduler import Deadline, Every, Scheduler


def test_due_jobs_run_in_the_order_added_and_a_wake_rereads_due_times() -> None:
    ran: list[str] = []

    async def scenario() -> None:
        scheduler = Scheduler()
        due: dict[str, float | None] = {"a": None, "b": None}

        def job(name: str) -> Deadline:
            def run() -> None:
                ran.append(name)
                due[name] = None

            return Deadline(name, lambda: due[name], run)

        scheduler.add(job("a"))
        scheduler.add(job("b"))
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.01)
        assert ran == []  # nothing due: the loop waits
        now = time.monotonic()
        due["b"] = due["a"] = now
        scheduler.wake()
        for _ in range(200):
            if len(ran) == 2:
                break
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert ran == ["a", "b"]


def test_every_takes_the_next_interval_from_its_work() -> None:
    intervals = iter([5.0, None])
    job = Every("retry", 1.0, lambda: next(intervals))
    start = time.monotonic()
    assert 0.9 <= (job.next_due() or 0) - start <= 1.1
    job.run()
    assert (job.next_due() or 0) - time.monotonic() > 4.0
    job.run()
    assert (job.next_due() or 0) - time.monotonic() <= 1.0


def test_a_due_time_fires_without_a_wake_and_wakes_in_between_neither_delay_nor_repeat_it() -> None:
    """The one armed timer runs a job when its time comes; the wakes that follow every message (the due
    time unchanged) re-read due times only: the job runs once, not before it is due."""
    ran: list[float] = []

    async def scenario() -> None:
        scheduler = Scheduler()
        due: list[float | None] = [time.monotonic() + 0.05]

        def run() -> None:
            ran.append(time.monotonic())
            due[0] = None

        scheduler.add(Deadline("core-timer", lambda: due[0], run))
        scheduler.add(Every("idle", 3600.0, lambda: None))
        task = asyncio.create_task(scheduler.run())
        for _ in range(20):
            scheduler.wake()
            await asyncio.sleep(0.001)
        for _ in range(400):
            if ran:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert due[0] is None

    start = time.monotonic()
    asyncio.run(scenario())
    assert len(ran) == 1
    assert ran[0] - start >= 0.045
