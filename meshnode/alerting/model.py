"""What an alert is: severities, the stable dedup key, and the event that a lifecycle change produces.

An :class:`AlertEvent` is the unit that travels from the lifecycle (:mod:`.lifecycle`) through the durable
outbox (:mod:`.outbox`) to every destination (:mod:`.pagerduty`, :mod:`.webhook`). It carries facts only:
no routing key, no URL, so the outbox on disk never holds a secret.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal
from urllib.parse import quote

import msgspec

Severity = Literal["critical", "error", "warning", "info"]
Action = Literal["trigger", "resolve"]

# PagerDuty's order; a re-trigger of an open alert happens only on a strictly higher rank.
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2, "critical": 3}
DEDUP_KEY_MAX_CHARS = 255  # PagerDuty Events v2 limit
DEDUP_KEY_PREFIX = "policymesh"
SUMMARY_MAX_CHARS = 1024  # PagerDuty Events v2 limit on payload.summary
DETAILS_MAX_BYTES = 8 * 1024  # custom_details, as JSON; larger details are cut (and say so)
# Characters left as they are in a key segment; anything else is percent-encoded (so the encoding is
# injective: two different subjects never share a key). "/" always separates segments.
_SAFE_SEGMENT_CHARS = "-._:@+=,~"


class AlertEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One lifecycle change of one alert, as delivered to every destination.

    ``opens_episode`` is true for the trigger that opened the alert (false for a re-trigger on
    escalation): a destination that never heard that trigger needs no resolve either.
    ``at`` is wall-clock seconds (Unix time) of detection."""

    action: Action
    dedup_key: str
    cluster: str
    node: str
    check: str
    subject: str
    severity: Severity
    summary: str
    at: float
    details: dict[str, Any] = {}
    opens_episode: bool = False


def dedup_key(cluster: str, node: str, check: str, subject: str) -> str:
    """``policymesh/<cluster>/<node>/<check>[/<subject>]``: stable, at most 255 safe characters.

    Segments are percent-encoded (``/`` and anything outside ``[A-Za-z0-9-._:@+=,~]``), so different
    inputs never collide; an empty subject leaves its segment out; a key that would exceed 255 characters
    replaces the subject (then, if still too long, everything after the prefix) by a SHA-256 digest."""
    head = "/".join((DEDUP_KEY_PREFIX, _segment(cluster), _segment(node), _segment(check)))
    key = head if not subject else f"{head}/{_segment(subject)}"
    if len(key) <= DEDUP_KEY_MAX_CHARS:
        return key
    key = f"{head}/sha256:{_digest(subject)}"
    if len(key) <= DEDUP_KEY_MAX_CHARS:
        return key
    return f"{DEDUP_KEY_PREFIX}/sha256:{_digest(chr(0).join((cluster, node, check, subject)))}"


def _segment(text: str) -> str:
    return quote(text, safe=_SAFE_SEGMENT_CHARS)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def clip_summary(summary: str) -> str:
    """A one-line summary of at most SUMMARY_MAX_CHARS characters (never empty)."""
    line = " ".join(summary.split()) or "(no summary)"
    return line if len(line) <= SUMMARY_MAX_CHARS else line[: SUMMARY_MAX_CHARS - 1] + "…"


def clip_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as JSON-safe values, at most DETAILS_MAX_BYTES once encoded (else cut and marked)."""
    if not details:
        return {}
    encoded = msgspec.json.encode(details, enc_hook=str)
    if len(encoded) <= DETAILS_MAX_BYTES:
        return msgspec.json.decode(encoded)  # type: ignore[no-any-return]
    text = encoded[: DETAILS_MAX_BYTES - 256].decode(errors="ignore")
    return {"truncated": True, "original_bytes": len(encoded), "text": text}
