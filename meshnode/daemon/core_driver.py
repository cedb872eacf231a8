"""Feeds inputs into the sans-IO gossip node and hands the effects it returns to the executor.

After every input the scheduler is woken, so the core's next deadline (a job of the scheduler) is
re-read. Local policy sources and the operator API submit through :meth:`CoreDriver.submit_policy`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from protocol.gossip import Node, Now, PolicyResult, PolicySubmitted, RootsSubmitted, TimerFired, Verdict

from ..metrics import Metrics
from .tasks import TaskSpawner


def now() -> Now:
    return Now(ms=int(time.monotonic() * 1000), wall=time.time())


class CoreDriver:
    def __init__(self, tasks: TaskSpawner, metrics: Metrics, log: Any, wake: Callable[[], None]) -> None:
        self.node: Node | None = None
        self._execute: Callable[[Sequence[Any]], None] | None = None
        self._tasks = tasks
        self._metrics = metrics
        self._log = log
        self._wake = wake
        # Where the input being handled came from (transport, try, reassembly wait): logged with the
        # ``policy.accepted`` it may cause, for the per-node timeline of a version.
        self.origin: dict[str, Any] = {}

    def wake(self) -> None:
        """Have the scheduler re-read every deadline (e.g. the datagram layer's)."""
        self._wake()

    def start(self, node: Node, execute: Callable[[Sequence[Any]], None]) -> None:
        self.node = node
        self._execute = execute

    def feed(self, inp: Any, origin: dict[str, Any] | None = None) -> list[Any]:
        assert self.node is not None and self._execute is not None
        effects = self.node.handle(now(), inp)
        self.origin = origin or {}
        try:
            self._execute(effects)
        finally:
            self.origin = {}
        self._wake()
        return effects

    def feed_if_running(self, inp: Any, origin: dict[str, Any] | None = None) -> None:
        if self.node is not None and self._tasks.serving:
            self.feed(inp, origin)

    def feed_later(self, inp: Any) -> None:
        asyncio.get_running_loop().call_soon(self.feed_if_running, inp)

    def next_deadline_s(self) -> float | None:
        """The core's next timer, in ``time.monotonic()`` seconds."""
        deadline = self.node.next_deadline() if self.node is not None else None
        return None if deadline is None else deadline / 1000

    def fire_timer(self) -> None:
        self.feed(TimerFired())

    def submit_policy(self, envelope: bytes, source: str, roots: Sequence[bytes] = ()) -> PolicyResult:
        """Feed a policy from a local source; returns the core's verdict (after it was persisted)."""
        if roots:
            for eff in self.feed(RootsSubmitted(chain=list(roots), source=source)):
                if isinstance(eff, PolicyResult) and not eff.accepted:
                    self._metrics.policies_refused.labels("bad_root").inc()
                    return eff
        result = PolicyResult(source, False, 0, Verdict.NO_VERDICT, "no verdict from the core")
        for eff in self.feed(PolicySubmitted(envelope=envelope, source=source), {"via": source}):
            if isinstance(eff, PolicyResult) and eff.source == source:
                result = eff
        if not result.accepted:
            self._metrics.policies_refused.labels(result.reason.value).inc()
            self._log.warning("policy.refused", source=source, reason=result.text)
        return result

