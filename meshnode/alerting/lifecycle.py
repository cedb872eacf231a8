"""The lifecycle of alerts: trigger when a condition starts, resolve when it clears, nothing in between.

:class:`AlertBook` is pure (sans-IO, like the core): the caller passes wall-clock ``now`` and gets back
the :class:`~.model.AlertEvent` list to hand to the outbox. An open alert is re-triggered only on a
strictly higher severity (critical > error > warning > info); raising it again at the same or a lower
severity only records that the condition still holds.

:class:`TransientAlerts` serves findings that have no "clear" (a rejected policy, a handshake flood):
the first occurrence triggers, repeats within ``quiet_s`` extend the episode silently, and the alert
resolves itself once ``quiet_s`` pass without a repeat — at most one trigger per (check, subject) per
episode.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from .model import SEVERITY_RANK, AlertEvent, Severity, clip_details, clip_summary, dedup_key

DEFAULT_MAX_OPEN = 1000
OVERFLOW_CHECK = "alerting.overflow"  # raised when more distinct alerts are open than the book tracks


@dataclass(slots=True)
class OpenAlert:
    """An alert whose condition holds. ``severity``/``summary``/``details`` are those of the last trigger
    sent (what the destinations show); ``last_seen`` and ``occurrences`` count the silent repeats."""

    check: str
    subject: str
    dedup_key: str
    severity: Severity
    summary: str
    details: dict[str, Any]
    since: float
    last_seen: float
    occurrences: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON view served by ``/v1/alerts`` and carried in the signed status."""
        return {"check": self.check, "subject": self.subject, "dedup_key": self.dedup_key,
                "severity": self.severity, "summary": self.summary, "details": self.details,
                "since": self.since, "last_seen": self.last_seen, "occurrences": self.occurrences}


class AlertBook:
    """The open alerts of one node, keyed by their dedup key; at most ``max_open`` of them (beyond that,
    new conditions are counted in ``refused`` and folded into one ``alerting.overflow`` alert)."""

    def __init__(self, cluster: str, node: str, *, max_open: int = DEFAULT_MAX_OPEN) -> None:
        if not cluster or not node:
            raise ValueError("an alert book needs a cluster and a node name")
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.cluster = cluster
        self.node = node
        self.max_open = max_open
        self.refused = 0
        self._open: dict[str, OpenAlert] = {}
        self._counts: dict[tuple[str, str], int] = {}  # open alerts by (check, severity), kept as they change

    def key(self, check: str, subject: str = "") -> str:
        return dedup_key(self.cluster, self.node, check, subject)

    def raise_(self, check: str, subject: str, severity: Severity, summary: str,
               details: dict[str, Any] | None, now: float) -> list[AlertEvent]:
        """The condition (check, subject) holds at ``now``: a trigger if it was not open or if ``severity``
        is higher than the one last sent; otherwise nothing."""
        if not check:
            raise ValueError("an alert needs a check name")
        if severity not in SEVERITY_RANK:
            raise ValueError(f"severity {severity!r}: one of {', '.join(SEVERITY_RANK)}")
        key = self.key(check, subject)
        alert = self._open.get(key)
        if alert is not None:
            alert.last_seen = max(alert.last_seen, now)
            alert.occurrences += 1
            if SEVERITY_RANK[severity] <= SEVERITY_RANK[alert.severity]:
                return []
            self._count(alert, -1)
            alert.severity, alert.summary, alert.details = severity, clip_summary(summary), clip_details(details)
            self._count(alert, +1)
            return [self._event("trigger", alert, now, opens_episode=False)]
        if check != OVERFLOW_CHECK and self._tracked() >= self.max_open:
            self.refused += 1
            return self._overflow(severity, now)
        alert = OpenAlert(check=check, subject=subject, dedup_key=key, severity=severity,
                          summary=clip_summary(summary), details=clip_details(details), since=now, last_seen=now)
        self._open[key] = alert
        self._count(alert, +1)
        return [self._event("trigger", alert, now, opens_episode=True)]

    def resolve(self, check: str, subject: str, now: float) -> list[AlertEvent]:
        """The condition (check, subject) cleared: one resolve if it was open, else nothing."""
        alert = self._open.pop(self.key(check, subject), None)
        if alert is None:
            return []
        self._count(alert, -1)
        events = [self._event("resolve", alert, now, opens_episode=False)]
        if check != OVERFLOW_CHECK and self._tracked() < self.max_open:
            events += self.resolve(OVERFLOW_CHECK, "", now)
        return events

    def resolve_check(self, check: str, now: float) -> list[AlertEvent]:
        """Resolve every open subject of ``check`` (e.g. all drift findings after a good re-apply)."""
        events: list[AlertEvent] = []
        for alert in [a for a in self._open.values() if a.check == check]:
            events += self.resolve(alert.check, alert.subject, now)
        return events

    def is_open(self, check: str, subject: str = "") -> bool:
        return self.key(check, subject) in self._open

    def get(self, check: str, subject: str = "") -> OpenAlert | None:
        return self._open.get(self.key(check, subject))

    def by_key(self, dedup_key: str) -> OpenAlert | None:
        return self._open.get(dedup_key)

    def open_alerts(self) -> list[OpenAlert]:
        """Open alerts, most severe first, then oldest first."""
        return sorted(self._open.values(), key=lambda a: (-SEVERITY_RANK[a.severity], a.since, a.dedup_key))

    def open_counts(self) -> dict[tuple[str, str], int]:
        """Open alerts by (check, severity): the ``policymesh_alerts_open`` gauge."""
        return dict(self._counts)

    def __len__(self) -> int:
        return len(self._open)

    def restore(self, alerts: list[OpenAlert]) -> None:
        """Reopen alerts saved by a previous run (their triggers were sent): a condition that still holds is
        then silent, one that cleared meanwhile gets its resolve. Only into an empty book."""
        if self._open:
            raise ValueError("restore into an empty book only")
        for alert in alerts:
            alert.dedup_key = self.key(alert.check, alert.subject)  # the cluster or node name may have changed
            if alert.severity in SEVERITY_RANK and alert.dedup_key not in self._open:
                self._open[alert.dedup_key] = alert
                self._count(alert, +1)

    def _count(self, alert: OpenAlert, delta: int) -> None:
        key = (alert.check, alert.severity)
        n = self._counts.get(key, 0) + delta
        if n:
            self._counts[key] = n
        else:
            del self._counts[key]

    def _tracked(self) -> int:
        return len(self._open) - (self.key(OVERFLOW_CHECK) in self._open)

    def _overflow(self, severity: Severity, now: float) -> list[AlertEvent]:
        events = self.raise_(OVERFLOW_CHECK, "", severity,
                             f"more than {self.max_open} alerts open on {self.node}; new ones are not tracked "
                             "individually (see the node's logs)", {"max_open": self.max_open}, now)
        overflow = self._open[self.key(OVERFLOW_CHECK)]
        overflow.details = {"max_open": self.max_open, "refused_total": self.refused}
        return events

    def _event(self, action: str, alert: OpenAlert, now: float, *, opens_episode: bool) -> AlertEvent:
        return AlertEvent(action=action, dedup_key=alert.dedup_key, cluster=self.cluster,  # type: ignore[arg-type]
                          node=self.node, check=alert.check, subject=alert.subject, severity=alert.severity,
                          summary=alert.summary, at=now, details=alert.details, opens_episode=opens_episode)


@dataclass(slots=True)
class TransientAlerts:
    """One-shot findings on top of a book: trigger on the first occurrence, auto-resolve after a quiet
    period. Time is passed in; the shell arms one timer at :meth:`next_deadline` and calls
    :meth:`handle_timer`."""

    book: AlertBook
    quiet_s: float = 600.0
    _quiet_until: dict[str, float] = field(default_factory=dict)
    _heap: list[tuple[float, str, str, str]] = field(default_factory=list)

    def note(self, check: str, subject: str, severity: Severity, summary: str,
             details: dict[str, Any] | None, now: float, *, quiet_s: float | None = None) -> list[AlertEvent]:
        """``check`` happened to ``subject`` at ``now``; the episode ends ``quiet_s`` after the last one."""
        events = self.book.raise_(check, subject, severity, summary, details, now)
        key = self.book.key(check, subject)
        if self.book.is_open(check, subject):
            until = now + (self.quiet_s if quiet_s is None else quiet_s)
            if until > self._quiet_until.get(key, float("-inf")):
                self._quiet_until[key] = until
                heapq.heappush(self._heap, (until, key, check, subject))
        return events

    def quiet_until(self) -> dict[str, float]:
        """When each open one-shot episode ends, by dedup key (saved with the open alerts)."""
        return dict(self._quiet_until)

    def restore(self, quiet_until: dict[str, float]) -> None:
        """Re-arm the episodes of restored one-shot alerts (keys not open in the book are ignored)."""
        for key, until in quiet_until.items():
            alert = self.book.by_key(key)
            if alert is not None:
                self._quiet_until[key] = until
                heapq.heappush(self._heap, (until, key, alert.check, alert.subject))

    def next_deadline(self) -> float | None:
        """Wall-clock second at which an episode may end, or None."""
        while self._heap and self._quiet_until.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # superseded by a later repeat, or already ended
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> list[AlertEvent]:
        """Resolve every transient alert whose quiet period has passed at ``now``."""
        events: list[AlertEvent] = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, key, check, subject = heapq.heappop(self._heap)
            del self._quiet_until[key]
            events += self.book.resolve(check, subject, now)
        return events
