"""One alert pipeline: lifecycle (trigger, nothing in between, resolve), a durable bounded outbox, and
delivery to PagerDuty Events API v2 and JSON webhooks with retries under a global rate budget.

Modules: ``model`` (severities, dedup key, the event), ``lifecycle`` (open alerts, one-shot findings),
``pagerduty`` and ``webhook`` (request bodies), ``outbox`` (durable queue), ``delivery`` (asyncio
worker), ``catalog`` (severities and kinds of the core's alerts, expiry lead time), ``pipeline`` (the
object the daemon holds).
"""

from .catalog import ALERT_RULES, expiry_severity, route_alert
from .delivery import AlertDelivery, Backoff, Destination, RateBudget
from .lifecycle import AlertBook, OpenAlert, TransientAlerts
from .model import AlertEvent, Severity, dedup_key
from .outbox import Outbox
from .pagerduty import DEFAULT_PAGERDUTY_URL, pagerduty_body
from .pipeline import AlertPipeline, destinations_from_config
from .webhook import webhook_body

__all__ = [
    "ALERT_RULES", "DEFAULT_PAGERDUTY_URL", "AlertBook", "AlertDelivery", "AlertEvent", "AlertPipeline", "Backoff",
    "Destination", "OpenAlert", "Outbox", "RateBudget", "Severity", "TransientAlerts", "dedup_key",
    "destinations_from_config", "expiry_severity", "pagerduty_body", "route_alert", "webhook_body",
]
