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
import msgspec

from ..fsutil import atomic_write, remove_stale_temps
from .delivery import AlertDelivery, Destination
from .lifecycle import AlertBook, OpenAlert, TransientAlerts
from .model import AlertEvent, Severity
from .outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, Outbox

if TYPE_CHECKING:
    from ..config import LoadedConfig
    from ..metrics import Metrics

OUTBOX_DIR = "alerts-outbox"  # under the node's data_dir
OPEN_ALERTS_FILE = "open.json"  # in the outbox directory: the open alerts, so a restart resolves what cleared
DEFAULT_QUIET_S = 600.0  # a one-shot finding's episode ends after this long without a repeat


def destinations_from_config(loaded: LoadedConfig) -> list[Destination]:
    """PagerDuty (when a routing key file is configured) and every webhook URL, in config order."""
    alerts = loaded.cfg.alerts
    out = [Destination.webhook(url) for url in alerts.webhook_urls]
    key = loaded.pagerduty_routing_key()
    if key is not None:
        out.insert(0, Destination.pagerduty(alerts.pagerduty_url, key))
    return out


class _SavedAlert(msgspec.Struct):
    check: str
    subject: str
    severity: Severity
    summary: str
    details: dict[str, Any]
    since: float
    last_seen: float
    occurrences: int
    quiet_until: float | None = None


class AlertPipeline:
    """Book, outbox and delivery of one node. The open alerts are saved (``open.json`` beside the
    outbox, written with the outbox) and restored at start, so a condition that cleared while the daemon
    was down is resolved by the next run's check instead of staying open at PagerDuty forever."""

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
        self._open_dirty = False
        remove_stale_temps(outbox.directory, lambda name: name == OPEN_ALERTS_FILE)
        self._load_open()
        self._sync_metrics()

    @classmethod
    def from_config(cls, loaded: LoadedConfig, node_id: str, *, log: Any, metrics: Metrics | None = None,
                    max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES) -> AlertPipeline:
        """The node's pipeline: outbox in ``<data_dir>/alerts-outbox`` (pending events loaded)."""
        destinations = destinations_from_config(loaded)
        outbox = Outbox(Path(loaded.resolve(loaded.cfg.node.data_dir)) / OUTBOX_DIR, [d.id for d in destinations],
                        log=log, max_events=max_events, max_bytes=max_bytes)
        return cls(AlertBook(loaded.cfg.cluster, node_id), outbox, destinations, log=log, metrics=metrics)

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
            self._open_dirty = True
            if self.delivery is not None:
                self.delivery.notify()  # it flushes on waking: a burst of events costs one flush
            else:
                self.flush()
            self._sync_metrics()
        return events

    def flush(self) -> None:
        """Make every recorded event durable now. While delivery runs, recorded events are written when the
        worker wakes (the next loop iteration); call this at shutdown, after the last alert."""
        self.outbox.flush()
        self._save_open()

    async def deliver(self, session: aiohttp.ClientSession, **options: Any) -> None:
        """Deliver until cancelled (``options``: see :class:`AlertDelivery`). Without destinations it returns
        at once (nothing is stored for delivery then)."""
        delivery = AlertDelivery(self.outbox, self.destinations, session, log=self.log, metrics=self.metrics,
                                 on_wake=self._save_open, **options)
        self.delivery = delivery
        try:
            await delivery.run()
        finally:
            self.delivery = None

    def _open_path(self) -> Path:
        return self.outbox.directory / OPEN_ALERTS_FILE

    def _save_open(self) -> None:
        if not self._open_dirty:
            return
        quiet = self.transient.quiet_until()
        saved = [_SavedAlert(a.check, a.subject, a.severity, a.summary, a.details, a.since, a.last_seen,
                             a.occurrences, quiet.get(a.dedup_key)) for a in self.book.open_alerts()]
        try:
            atomic_write(self._open_path(), msgspec.json.encode(saved), 0o600)
        except OSError as exc:
            self.log.error("alert.open_save_failed", error=exc.strerror or str(exc),
                           note="a restart would not resolve alerts that clear meanwhile")
            return
        self._open_dirty = False

    def _load_open(self) -> None:
        try:
            data = self._open_path().read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.error("alert.open_unreadable", error=exc.strerror or str(exc))
            return
        try:
            saved = msgspec.json.decode(data, type=list[_SavedAlert])
        except (msgspec.DecodeError, ValueError) as exc:
            self.log.warning("alert.open_corrupt", error=str(exc)[:200], note="open alerts start empty")
            return
        self.book.restore([OpenAlert(s.check, s.subject, "", s.severity, s.summary, s.details, s.since,
                                     s.last_seen, s.occurrences) for s in saved])
        self.transient.restore({self.book.key(s.check, s.subject): s.quiet_until
                                for s in saved if s.quiet_until is not None})

    def _sync_metrics(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_open_alerts(self.book.open_counts())
        self.metrics.alert_outbox_events.set(len(self.outbox))
        if self.outbox.dropped > self._dropped_reported:
            self.metrics.alert_outbox_dropped.inc(self.outbox.dropped - self._dropped_reported)
            self._dropped_reported = self.outbox.dropped
