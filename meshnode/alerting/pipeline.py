"""The alert pipeline of one node: lifecycle book -> durable outbox -> delivery, plus the metrics.

This is the one object the daemon holds. Everything that is worth paging goes through it:

- a condition with a "clear" (drift, apply failed, stale policy, expiring certificate, unreachable peer):
  :meth:`AlertPipeline.raise_` while it holds (as often as convenient: repeats are silent) and
  :meth:`AlertPipeline.resolve` when it clears;
- a one-shot finding (policy rejected, equivocation, handshake abuse): :meth:`AlertPipeline.note`; it
  resolves itself after a quiet period, driven by :meth:`next_deadline` / :meth:`handle_timer`;

and :meth:`AlertPipeline.deliver` runs the delivery tasks (inside the daemon's TaskGroup) with the
daemon's aiohttp session. Time is passed in as wall-clock seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from .delivery import AlertDelivery, Destination
from .lifecycle import AlertBook, OpenAlert, TransientAlerts
from .model import AlertEvent, Severity
from .outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, Outbox

if TYPE_CHECKING:
    from ..config import LoadedConfig
    from ..metrics import Metrics

OUTBOX_DIR = "alerts-outbox"  # under the node's data_dir
DEFAULT_QUIET_S = 600.0  # a one-shot finding's episode ends after this long without a repeat


def destinations_from_config(lc: LoadedConfig) -> list[Destination]:
    """PagerDuty (when a routing key file is configured) and every webhook URL, in config order."""
    alerts = lc.cfg.alerts
    out = [Destination.webhook(url) for url in alerts.webhook_urls]
    key = lc.pagerduty_routing_key()
    if key is not None:
        out.insert(0, Destination.pagerduty(alerts.pagerduty_url, key))
    return out


class AlertPipeline:
    def __init__(self, book: AlertBook, outbox: Outbox, destinations: Sequence[Destination], *, log: Any,
                 metrics: Metrics | None = None, quiet_s: float = DEFAULT_QUIET_S) -> None:
        self.book = book
        self.transient = TransientAlerts(book, quiet_s)
        self.outbox = outbox
        self.destinations = tuple(destinations)
        self.log = log
        self.metrics = metrics
        self.delivery: AlertDelivery | None = None
        self._dropped_reported = outbox.dropped
        self._sync_metrics()

    @classmethod
    def from_config(cls, lc: LoadedConfig, node_id: str, *, log: Any, metrics: Metrics | None = None,
                    max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES) -> AlertPipeline:
        """The node's pipeline: outbox in ``<data_dir>/alerts-outbox`` (pending events loaded)."""
        destinations = destinations_from_config(lc)
        outbox = Outbox(Path(lc.resolve(lc.cfg.node.data_dir)) / OUTBOX_DIR, [d.id for d in destinations],
                        log=log, max_events=max_events, max_bytes=max_bytes)
        return cls(AlertBook(lc.cfg.cluster, node_id), outbox, destinations, log=log, metrics=metrics)

    # -- what the daemon reports ---------------------------------------------------------------------------
    def raise_(self, check: str, subject: str, severity: Severity, summary: str,
               details: dict[str, Any] | None, now: float) -> list[AlertEvent]:
        return self.record(self.book.raise_(check, subject, severity, summary, details, now))

    def resolve(self, check: str, subject: str, now: float) -> list[AlertEvent]:
        return self.record(self.book.resolve(check, subject, now))

    def resolve_check(self, check: str, now: float) -> list[AlertEvent]:
        return self.record(self.book.resolve_check(check, now))

    def note(self, check: str, subject: str, severity: Severity, summary: str,
             details: dict[str, Any] | None, now: float, *, quiet_s: float | None = None) -> list[AlertEvent]:
        return self.record(self.transient.note(check, subject, severity, summary, details, now, quiet_s=quiet_s))

    def next_deadline(self) -> float | None:
        """Wall-clock second at which :meth:`handle_timer` has work (a one-shot episode may end)."""
        return self.transient.next_deadline()

    def handle_timer(self, now: float) -> list[AlertEvent]:
        return self.record(self.transient.handle_timer(now))

    def open_alerts(self) -> list[OpenAlert]:
        return self.book.open_alerts()

    # -- plumbing ------------------------------------------------------------------------------------------
    def record(self, events: list[AlertEvent]) -> list[AlertEvent]:
        """Log and store ``events`` for delivery; returns them."""
        for event in events:
            log = self.log.warning if event.action == "trigger" else self.log.info
            log(f"alert.{event.action}", check=event.check, subject=event.subject, severity=event.severity,
                summary=event.summary, dedup_key=event.dedup_key, details=event.details)
            self.outbox.append(event)
        if events:
            if self.delivery is not None:
                self.delivery.notify()  # it flushes on waking: a burst of events costs one flush
            else:
                self.outbox.flush()
            self._sync_metrics()
        return events

    def flush(self) -> None:
        """Make every recorded event durable now. While delivery runs, recorded events are written when the
        worker wakes (the next loop iteration); call this at shutdown, after the last alert."""
        self.outbox.flush()

    async def deliver(self, session: aiohttp.ClientSession, **options: Any) -> None:
        """Deliver until cancelled (``options``: see :class:`AlertDelivery`). Without destinations it returns
        at once (nothing is stored for delivery then)."""
        delivery = AlertDelivery(self.outbox, self.destinations, session, log=self.log, metrics=self.metrics,
                                 **options)
        self.delivery = delivery
        try:
            await delivery.run()
        finally:
            self.delivery = None

    def _sync_metrics(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_open_alerts(self.book.open_counts())
        self.metrics.alert_outbox_events.set(len(self.outbox))
        if self.outbox.dropped > self._dropped_reported:
            self.metrics.alert_outbox_dropped.inc(self.outbox.dropped - self._dropped_reported)
            self._dropped_reported = self.outbox.dropped
