"""The daemon's side of alerting: every alert event of the core, the enforcer and the daemon goes into
the node's :class:`~meshnode.alerting.AlertPipeline` (lifecycle, durable outbox, PagerDuty/webhook
delivery), and the expiry job raises and resolves the conditions that come with time.

The one entry point for events is :meth:`AlertSender.alert`: it counts the event, logs it as
``alert.<event>`` with what the lifecycle made of it (``trigger``, ``resolve`` or ``repeat``: a silent
repeat while the condition holds) and never blocks the caller (delivery runs in its own task).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from protocol.trust import Certificate, PolicyVersion

from ..alerting import AlertEvent, AlertPipeline, expiry_severity, route_alert
from ..alerting.catalog import rule_for
from ..metrics import Metrics

EXPIRY_CHECK_S = 30.0  # how often the expiry job looks at the certificate and the policy


class AlertSender:
    def __init__(self, pipeline: AlertPipeline, metrics: Metrics, log: Any, wake: Callable[[], None]) -> None:
        self.pipeline = pipeline
        self._metrics = metrics
        self._log = log
        self._wake = wake  # the scheduler: a one-shot finding moves the pipeline's deadline

    def alert(self, event: str, fields: dict[str, Any]) -> None:
        """Count, log and route one alert event (a core ``Alert``, an enforcer or daemon event)."""
        self._metrics.alerts.labels(event).inc()
        events = route_alert(self.pipeline, event, fields, time.time())
        outcome = ",".join(e.action for e in events) or ("ignored" if rule_for(event).kind == "ignore" else "repeat")
        name = event if event.startswith("alert.") else f"alert.{event}"
        log = self._log.info if outcome == "resolve" else self._log.warning
        log(name, alert_action=outcome, **fields)
        if events:
            self._wake()

    def next_deadline_monotonic(self) -> float | None:
        """The pipeline's next timer (wall clock) on the scheduler's clock (``time.monotonic()``)."""
        deadline = self.pipeline.next_deadline()
        return None if deadline is None else time.monotonic() + (deadline - time.time())

    def handle_timer(self) -> None:
        self.pipeline.handle_timer(time.time())

    def check_expiry(self, cert: Certificate, policy: PolicyVersion | None, policy_state: str,
                     now: float) -> list[AlertEvent]:
        """The lead-time rule for the node certificate and the trusted policy (warning with 25% of the
        validity left, critical once expired, resolved once renewed), and ``policy.stale`` while the
        policy is stale (resolved when it is fresh again). Repeats are silent: run it on a timer."""
        out = self._expiry("node.certificate_expiring", "node certificate", cert.not_before, cert.not_after,
                           {"cert_id": cert.cert_id, "not_after": cert.not_after}, now)
        if policy is None:
            out += self.pipeline.resolve("policy.expiring", "", now)
        else:
            out += self._expiry("policy.expiring", f"policy serial {policy.serial}", policy.issued_at,
                                policy.expires_at, {"serial": policy.serial, "expires_at": policy.expires_at}, now)
        if policy_state == "stale" and policy is not None:
            node = self.pipeline.book.node
            out += self.pipeline.raise_("policy.stale", "", "error",
                                        f"policy.stale on {node}: serial {policy.serial} is stale (expired or "
                                        "signed by keys the root no longer trusts); still enforced",
                                        {"serial": policy.serial, "expires_at": policy.expires_at}, now)
        else:
            out += self.pipeline.resolve("policy.stale", "", now)
        if out:
            self._wake()
        return out

    def _expiry(self, check: str, what: str, valid_from: float, valid_until: float, details: dict[str, Any],
                now: float) -> list[AlertEvent]:
        severity = expiry_severity(valid_from, valid_until, now)
        if severity is None:
            return self.pipeline.resolve(check, "", now)
        left_s = valid_until - now
        state = "expired" if left_s <= 0 else f"expires in {left_s / 3600:.1f} h"
        summary = f"{check} on {self.pipeline.book.node}: {what} {state}"
        return self.pipeline.raise_(check, "", severity, summary, {**details, "seconds_left": round(left_s)}, now)
