"""Which findings are conditions and which are one-shot, at what severity: the alert events of the core
and of the shell mapped onto the lifecycle, and the lead-time rule for anything that expires.

The core (``protocol/``) emits ``Alert(event, fields)`` effects, the enforcer ``EnforcementEvent(name,
facts)``, the daemon its own ``state.*`` / ``node.*`` events, all with stable dotted names. Some describe a
condition and the event that clears it (``enforce.drift_detected`` then ``enforce.drift_repaired``), most
are one-shot findings. :func:`route_alert` turns one into lifecycle calls on the pipeline. Events not
listed here are one-shot warnings under their own name, so a new alert is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .model import AlertEvent, Severity

if TYPE_CHECKING:
    from .pipeline import AlertPipeline

EXPIRY_WARNING_FRACTION = 0.25  # warning once 25% of the validity period is left; critical once expired


@dataclass(frozen=True, slots=True)
class AlertRule:
    """``kind``: ``condition`` (raised; the daemon or a later core event resolves it), ``resolve`` (clears
    ``check``), ``transient`` (one-shot: resolves itself after a quiet period), ``ignore`` (logged by the
    caller, never paged: another check owns the condition). ``subject_field`` names the fact that tells
    two instances apart (the peer, the source), if any."""

    check: str
    severity: Severity
    kind: Literal["condition", "resolve", "transient", "ignore"]
    subject_field: str | None = None


ALERT_RULES: dict[str, AlertRule] = {
    # -- the core (protocol.gossip.events.Alert effects) --
    # Conditions. policy.stale is also raised and resolved by the daemon's expiry job (fresh again: resolved);
    # the core says it once and never when it clears. The core repeats node.certificate_expiring every
    # housekeeping tick from 7 days before expiry: the daemon's expiry job owns that condition with the
    # lead-time rule (expiry_severity), so the core's repeats are not paged.
    "policy.stale": AlertRule("policy.stale", "error", "condition"),
    "node.certificate_expiring": AlertRule("node.certificate_expiring", "warning", "ignore"),
    "node.certificate_invalid": AlertRule("node.certificate_invalid", "critical", "condition"),
    "policy.not_enforced": AlertRule("policy.not_enforced", "critical", "condition"),
    "policy.not_enforced.resolved": AlertRule("policy.not_enforced", "critical", "resolve"),
    # One-shot findings.
    "policy.equivocation": AlertRule("policy.equivocation", "critical", "transient", "serial"),
    "policy.rollback_attempt": AlertRule("policy.rollback_attempt", "error", "transient", "source"),
    "policy.rejected": AlertRule("policy.rejected", "warning", "transient", "source"),
    "root.rejected": AlertRule("root.rejected", "warning", "transient", "source"),
    "policy.stale_offer": AlertRule("policy.stale_offer", "warning", "transient", "peer"),
    "gossip.unserved_claim": AlertRule("gossip.unserved_claim", "warning", "transient", "peer"),
    "gossip.pull_flood": AlertRule("gossip.pull_flood", "warning", "transient", "peer"),
    "gossip.remote_error": AlertRule("gossip.remote_error", "info", "transient", "peer"),
    "membership.expelled": AlertRule("membership.expelled", "warning", "transient", "node"),
    # -- the enforcer (EnforcementEvent) --
    "enforce.drift_detected": AlertRule("enforce.drift", "critical", "condition", "table"),
    "enforce.drift_repair_failed": AlertRule("enforce.drift", "critical", "condition", "table"),
    "enforce.drift_repaired": AlertRule("enforce.drift", "critical", "resolve", "table"),
    # the enforcer says enforce.apply_recovered on the first good apply after a failure
    "enforce.apply_failed": AlertRule("enforce.apply_failed", "error", "condition"),
    "enforce.apply_recovered": AlertRule("enforce.apply_failed", "error", "resolve"),
    # -- the daemon --
    "state.write_failed": AlertRule("state.write_failed", "error", "condition"),
    "state.write_recovered": AlertRule("state.write_failed", "error", "resolve"),
    "node.internal_error": AlertRule("node.internal_error", "error", "transient"),
    "node.task_failed": AlertRule("node.task_failed", "critical", "transient", "task"),
}


def rule_for(event: str) -> AlertRule:
    return ALERT_RULES.get(event) or AlertRule(event, "warning", "transient")


def route_alert(pipeline: AlertPipeline, event: str, fields: dict[str, Any], now: float) -> list[AlertEvent]:
    """Feed one alert event (a core ``Alert`` effect, an ``EnforcementEvent``, a daemon event) into the
    pipeline, at wall-clock ``now``."""
    rule = rule_for(event)
    subject = str(fields.get(rule.subject_field, "")) if rule.subject_field else ""
    if rule.kind == "ignore":
        return []
    if rule.kind == "resolve":
        return pipeline.resolve(rule.check, subject, now)
    summary = summarize(rule.check, pipeline.book.node, subject, fields)
    if rule.kind == "condition":
        return pipeline.raise_(rule.check, subject, rule.severity, summary, fields, now)
    return pipeline.note(rule.check, subject, rule.severity, summary, fields, now)


def summarize(check: str, node: str, subject: str, fields: dict[str, Any]) -> str:
    """``policy.rejected on node-1 (source peer:n2): reason=expired, error=...`` (clipped later)."""
    facts = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "subject")
    return f"{check} on {node}" + (f" ({subject})" if subject else "") + (f": {facts}" if facts else "")


def expiry_severity(valid_from: float, valid_until: float, now: float) -> Severity | None:
    """The lead-time rule for certificates and policies: None while more than 25% of the validity period
    is left, ``warning`` below that, ``critical`` once expired. Raise it on every check and resolve on
    None: the book sends the warning once, escalates once, and resolves after a renewal."""
    if now >= valid_until:
        return "critical"
    lead = max(0.0, valid_until - valid_from) * EXPIRY_WARNING_FRACTION
    return "warning" if valid_until - now <= lead else None
