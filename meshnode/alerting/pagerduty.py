"""PagerDuty Events API v2 request bodies (``POST https://events.pagerduty.com/v2/enqueue``).

Per PagerDuty's "Send an Alert Event" reference: a trigger carries ``routing_key`` (the service
integration's 32-character key), ``event_action``, ``dedup_key`` (at most 255 characters),
``payload`` {``summary`` (at most 1024 characters), ``source``, ``severity`` (critical|error|warning|
info), ``timestamp`` (ISO 8601), ``component``, ``group``, ``class``, ``custom_details``} and
``client``; a resolve carries ``routing_key``, ``event_action`` and ``dedup_key`` only. PagerDuty
answers 202 when it accepted the event, 400 for an invalid one (not worth retrying), 429 and 5xx when
the client should retry later. Bodies are capped at 512 KB; ours stay far below (details are cut at 8 KiB).

Mapping of our facts: ``source`` is the node id, ``group`` the cluster, ``class`` the check
(``enforce.drift``), ``component`` the check's area (``enforce``), ``custom_details`` the alert's
details plus the cluster, node, check and subject.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from .model import AlertEvent

DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
CLIENT_NAME = "policymesh"


def iso8601(at: float) -> str:
    """Unix seconds as an ISO 8601 UTC timestamp with milliseconds (``2024-05-01T12:00:00.000+00:00``)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def component_of(check: str) -> str:
    """The area a check belongs to: ``enforce`` for ``enforce.drift``."""
    return check.split(".", 1)[0]


def pagerduty_body(event: AlertEvent, routing_key: str) -> dict[str, Any]:
    """The exact Events v2 JSON object for one lifecycle event."""
    if event.action == "resolve":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": event.dedup_key}
    details = dict(event.details)
    details.update(cluster=event.cluster, node=event.node, check=event.check)
    if event.subject:
        details["subject"] = event.subject
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": event.dedup_key,
        "payload": {
            "summary": event.summary,
            "source": event.node,
            "severity": event.severity,
            "timestamp": iso8601(event.at),
            "component": component_of(event.check),
            "group": event.cluster,
            "class": event.check,
            "custom_details": details,
        },
        "client": CLIENT_NAME,
    }


def encode_pagerduty(event: AlertEvent, routing_key: str) -> bytes:
    return msgspec.json.encode(pagerduty_body(event, routing_key))
