"""Alert delivery: each alert is counted, logged as ``alert.<event>`` and POSTed to every webhook.

The one entry point is :meth:`AlertSender.alert`; delivery is best effort (a webhook that fails is
logged, never retried) and never blocks the caller.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from ..metrics import Metrics
from .tasks import TaskSpawner

WEBHOOK_TIMEOUT_S = 5


class AlertSender:
    def __init__(self, node_id: str, webhook_urls: tuple[str, ...] | list[str], metrics: Metrics, log: Any,
                 tasks: TaskSpawner) -> None:
        self.node_id = node_id
        self.webhook_urls = tuple(webhook_urls)
        self.http: aiohttp.ClientSession | None = None  # set once the daemon has its HTTP client
        self._metrics = metrics
        self._log = log
        self._tasks = tasks

    def alert(self, event: str, fields: dict[str, Any]) -> None:
        self._metrics.alerts.labels(event).inc()
        self._log.warning(f"alert.{event}" if not event.startswith("alert.") else event, **fields)
        if self.webhook_urls and self.http is not None:
            body = {"node": self.node_id, "event": event, "fields": fields, "at": time.time()}
            for url in self.webhook_urls:
                self._tasks.spawn(self._post(self.http, url, body))

    async def _post(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
        try:
            async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as resp:
                if resp.status >= 300:
                    self._log.warning("alert.webhook_failed", url=url, status=resp.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._log.warning("alert.webhook_failed", url=url, reason=str(exc) or type(exc).__name__)
