"""Deliver outbox events to PagerDuty and webhooks: in order per destination, with retries, under a budget.

One asyncio task per destination takes the oldest event that destination has not taken, spends a token
of the global :class:`RateBudget` (shared by all destinations and retries, so a storm of alerts cannot
become thousands of posts), and posts it:

- 2xx: delivered; the outbox cursor moves on.
- 429, 5xx, timeouts and connection errors: retried, same event, after an exponential backoff with
  jitter (:class:`Backoff`; a 429's ``Retry-After`` is honoured up to the backoff cap). Later events for
  that destination wait behind it: order is kept.
- any other 4xx (or 1xx/3xx): the receiver refuses this body for good; it is logged, counted as
  ``rejected`` and skipped, never retried forever.

Clock, sleep and RNG are injected so tests run on virtual time. URLs are logged without path or query
(webhook URLs often carry a token).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import aiohttp

from .model import AlertEvent
from .outbox import Outbox, StoredEvent
from .pagerduty import encode_pagerduty
from .webhook import encode_webhook

if TYPE_CHECKING:
    from ..metrics import Metrics

DEFAULT_RATE_PER_S = 2.0
DEFAULT_BURST = 20
DEFAULT_TIMEOUT_S = 10.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0  # PagerDuty asks for "a backoff of a few minutes" on 429
RESPONSE_SNIPPET_BYTES = 512

Result = Literal["delivered", "rejected", "retry"]


def redact_url(url: str) -> str:
    """``https://host:port/…``: enough to tell destinations apart in logs, no path or query secrets."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where events go. ``id`` is stable across restarts (the outbox keeps a cursor per id)."""

    id: str
    kind: Literal["pagerduty", "webhook"]
    url: str
    routing_key: str = ""

    @classmethod
    def pagerduty(cls, url: str, routing_key: str) -> Destination:
        return cls("pagerduty", "pagerduty", url, routing_key)

    @classmethod
    def webhook(cls, url: str) -> Destination:
        return cls("webhook-" + hashlib.sha256(url.encode()).hexdigest()[:12], "webhook", url)

    def encode(self, event: AlertEvent) -> bytes:
        return encode_pagerduty(event, self.routing_key) if self.kind == "pagerduty" else encode_webhook(event)


class RateBudget:
    """A token bucket: ``burst`` posts at once, then ``rate_per_s`` on average. Pure: time is passed in."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate budget needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take one token if there is one (returns 0), else return the seconds until there will be."""
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._updated) * self.rate_per_s)
        self._updated = max(self._updated, now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate_per_s


class Backoff:
    """Exponential backoff with equal jitter: the n-th consecutive failure waits between half and all of
    ``min(max_s, base_s * 2**n)``."""

    def __init__(self, rng: random.Random, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.rng = rng
        self.base_s = base_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.base_s * 2 ** min(self.failures, 32))
        self.failures += 1
        return cap / 2 + self.rng.random() * cap / 2

    def reset(self) -> None:
        self.failures = 0


class AlertDelivery:
    """Runs until cancelled; call :meth:`notify` after appending to the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        session: aiohttp.ClientSession,
        *,
        log: Any,
        metrics: Metrics | None = None,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: int = DEFAULT_BURST,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        ids = [d.id for d in destinations]
        if sorted(ids) != sorted(outbox.destinations):
            raise ValueError(f"the outbox serves {list(outbox.destinations)}, delivery was given {ids}")
        self.outbox = outbox
        self.destinations = tuple(destinations)
        self.session = session
        self.log = log
        self.metrics = metrics
        self.budget = RateBudget(rate_per_s, burst, clock())
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.clock = clock
        self.sleep = sleep
        rng = rng or random.Random()
        self._backoff = {d.id: Backoff(rng, backoff_base_s, backoff_max_s) for d in destinations}
        self._wake = {d.id: asyncio.Event() for d in destinations}
        self.on_wake = on_wake  # called with the outbox flush (the pipeline saves its open alerts there)
        self.counts: Counter[tuple[str, str]] = Counter()  # (destination id, result): what the metric counts

    def notify(self) -> None:
        """New events are in the outbox."""
        for event in self._wake.values():
            event.set()

    def _flush(self) -> None:
        """What was appended since the last wake-up becomes durable, oldest first."""
        self.outbox.flush()
        if self.on_wake is not None:
            self.on_wake()

    async def run(self) -> None:
        self._flush()
        async with asyncio.TaskGroup() as tg:
            for dest in self.destinations:
                tg.create_task(self._serve(dest), name=f"alerts:{dest.id}")

    async def _serve(self, dest: Destination) -> None:
        wake = self._wake[dest.id]
        while True:
            self._flush()
            stored = self.outbox.next_event(dest.id)
            if stored is None:
                wake.clear()
                if self.outbox.next_event(dest.id) is None:
                    await wake.wait()
                continue
            while (wait := self.budget.take(self.clock())) > 0:
                await self.sleep(wait)
            result, retry_after = await self._post(dest, stored)
            self._count(dest, result)
            if result == "retry":
                delay = self._backoff[dest.id].next_delay()
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self._backoff[dest.id].max_s))
                await self.sleep(delay)
                continue
            self._backoff[dest.id].reset()
            self.outbox.ack(dest.id, stored.seq)
            if self.metrics is not None:
                self.metrics.alert_outbox_events.set(len(self.outbox))

    async def _post(self, dest: Destination, stored: StoredEvent) -> tuple[Result, float | None]:
        event = stored.event
        facts = {"destination": dest.id, "url": redact_url(dest.url), "seq": stored.seq,
                 "dedup_key": event.dedup_key, "action": event.action}
        try:
            async with self.session.post(dest.url, data=dest.encode(event), timeout=self.timeout,
                                         headers={"Content-Type": "application/json"}) as resp:
                status = resp.status
                snippet = (await resp.content.read(RESPONSE_SNIPPET_BYTES)).decode(errors="replace")
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.log.warning("alert.delivery_failed", **facts, reason=str(exc)[:200] or type(exc).__name__,
                             attempt=self._backoff[dest.id].failures + 1)
            return "retry", None
        if 200 <= status < 300:
            self.log.info("alert.delivered", **facts, status=status)
            return "delivered", None
        if status == 429 or status >= 500:
            self.log.warning("alert.delivery_failed", **facts, status=status, response=snippet[:200],
                             attempt=self._backoff[dest.id].failures + 1)
            return "retry", retry_after if status == 429 else None
        self.log.error("alert.delivery_rejected", **facts, status=status, response=snippet,
                       note="the receiver refused this event for good; dropped")
        return "rejected", None

    def _count(self, dest: Destination, result: Result) -> None:
        label = "failed" if result == "retry" else result
        self.counts[(dest.id, label)] += 1
        if self.metrics is not None:
            self.metrics.alert_deliveries.labels(dest.id, label).inc()


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is ignored: the backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
