"""The generic webhook body: the same facts as the PagerDuty event, in our own documented schema.

Each lifecycle event is one ``POST`` of ``Content-Type: application/json``::

    {
      "schema": "policymesh.alert/v1",
      "action": "trigger" | "resolve",
      "dedup_key": "policymesh/<cluster>/<node>/<check>[/<subject>]",  # same key as PagerDuty's
      "cluster": "prod", "node": "node-1",
      "check": "enforce.drift",           # stable dotted name: what was checked
      "subject": "table policymesh",      # what it was checked on ("" when the check has one subject)
      "severity": "critical" | "error" | "warning" | "info",
      "summary": "one line, at most 1024 characters",
      "details": {...},                   # facts as key/values (at most 8 KiB as JSON)
      "at": "2024-05-01T12:00:00.000+00:00",  # detection time, ISO 8601 UTC
      "at_unix": 1714564800.0,
      "first": true                       # this trigger opened the episode (false: escalation, resolve)
    }

A receiver answers any 2xx to accept. 429 and 5xx are retried with backoff; other 4xx answers drop the
event (counted and logged): the receiver said it will never take it. Delivery is at least once and in
order per dedup key, so a receiver that sees a ``trigger`` twice for an open key can ignore the repeat.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .model import AlertEvent
from .pagerduty import iso8601

WEBHOOK_SCHEMA = "policymesh.alert/v1"


def webhook_body(event: AlertEvent) -> dict[str, Any]:
    return {
        "schema": WEBHOOK_SCHEMA,
        "action": event.action,
        "dedup_key": event.dedup_key,
        "cluster": event.cluster,
        "node": event.node,
        "check": event.check,
        "subject": event.subject,
        "severity": event.severity,
        "summary": event.summary,
        "details": event.details,
        "at": iso8601(event.at),
        "at_unix": event.at,
        "first": event.opens_episode,
    }


def encode_webhook(event: AlertEvent) -> bytes:
    return msgspec.json.encode(webhook_body(event))
