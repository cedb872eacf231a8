"""Which findings are conditions and which are one-shot, at what severity: the core's ``Alert`` effects
mapped onto the lifecycle, and the lead-time rule for anything that expires.

The core (``protocol/``) emits ``Alert(event, fields)`` effects with stable dotted names; some describe a
condition that later clears (``policy.not_enforced`` then ``policy.not_enforced.resolved``), most are
one-shot findings. :func:`route_core_alert` turns one into lifecycle calls on the pipeline. Events not
listed here are one-shot warnings under their own name, so a new core alert is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .model import AlertEvent, Severity

if TYPE_CHECKING:
    from .pipeline import AlertPipeline

EXPIRY_WARNING_FRACTION = 0.25  # warning once 25% of the validity period is left; critical once expired


@dataclass(frozen=True, slots=True)
class CoreAlertRule:
    """``kind``: ``condition`` (raised; the daemon or a later core event resolves it), ``resolve`` (clears
    ``check``), ``transient`` (one-shot: resolves itself after a quiet period). ``subject_field`` names the
    fact that tells two instances apart (the peer, the source), if any."""

    check: str
    severity: Severity
    kind: Literal["condition", "resolve", "transient"]
    subject_field: str | None = None


CORE_ALERTS: dict[str, CoreAlertRule] = {
    # Conditions. policy.stale and node.certificate_expiring are resolved by the daemon when the policy is
    # fresh again / the certificate renewed (see expiry_severity); the core does not say when they clear.
    "policy.stale": CoreAlertRule("policy.stale", "error", "condition"),
    "node.certificate_expiring": CoreAlertRule("node.certificate_expiring", "warning", "condition"),
    "node.certificate_invalid": CoreAlertRule("node.certificate_invalid", "critical", "condition"),
    "policy.not_enforced": CoreAlertRule("policy.not_enforced", "critical", "condition"),
    "policy.not_enforced.resolved": CoreAlertRule("policy.not_enforced", "critical", "resolve"),
    # One-shot findings.
    "policy.equivocation": CoreAlertRule("policy.equivocation", "critical", "transient", "serial"),
    "policy.rollback_attempt": CoreAlertRule("policy.rollback_attempt", "error", "transient", "source"),
    "policy.rejected": CoreAlertRule("policy.rejected", "warning", "transient", "source"),
    "root.rejected": CoreAlertRule("root.rejected", "warning", "transient", "source"),
    "policy.stale_offer": CoreAlertRule("policy.stale_offer", "warning", "transient", "peer"),
    "gossip.unserved_claim": CoreAlertRule("gossip.unserved_claim", "warning", "transient", "peer"),
    "gossip.pull_flood": CoreAlertRule("gossip.pull_flood", "warning", "transient", "peer"),
    "gossip.remote_error": CoreAlertRule("gossip.remote_error", "info", "transient", "peer"),
    "membership.expelled": CoreAlertRule("membership.expelled", "warning", "transient", "node"),
}


def rule_for(event: str) -> CoreAlertRule:
    return CORE_ALERTS.get(event) or CoreAlertRule(event, "warning", "transient")


def route_core_alert(pipeline: AlertPipeline, event: str, fields: dict[str, Any], now: float) -> list[AlertEvent]:
    """Feed one core ``Alert(event, fields)`` effect into the pipeline."""
    rule = rule_for(event)
    subject = str(fields.get(rule.subject_field, "")) if rule.subject_field else ""
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
