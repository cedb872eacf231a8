"""The admin HTTP listener: /healthz, /readyz, /v1/status, /v1/alerts and /metrics (loopback unless overridden)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.trust import TrustedState

from ..enforcer import Enforcer
from ..metrics import Metrics


class AdminHttp:
    def __init__(self, *, status: Callable[[], dict[str, Any]], alerts: Callable[[], list[dict[str, Any]]],
                 enforcer: Enforcer, trust: TrustedState, metrics: Metrics, observe: Callable[[], None]) -> None:
        self._status = status
        self._alerts = alerts
        self._enforcer = enforcer
        self._trust = trust
        self._metrics = metrics
        self._observe = observe  # sets the gauges read at scrape time

    def app(self) -> web.Application:
        admin = web.Application()
        admin.router.add_get("/healthz", self.healthz)
        admin.router.add_get("/readyz", self.readyz)
        admin.router.add_get("/v1/status", self.status)
        admin.router.add_get("/v1/alerts", self.alerts)
        admin.router.add_get("/metrics", self.metrics)
        return admin

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        enforcement = self._enforcer.status()
        if enforcement.get("applied_serial", 0) > 0:
            return web.Response(text=f"ready: enforcing serial {enforcement['applied_serial']}\n")
        return web.Response(status=503, text="not ready: no valid policy enforced yet\n")

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self._status(), indent=1, default=str), content_type="application/json")

    async def alerts(self, request: web.Request) -> web.Response:
        """The open alerts of this node: ``{"alerts": [...]}``, oldest first."""
        return web.json_response({"alerts": self._alerts()}, dumps=lambda v: json.dumps(v, indent=1, default=str))

    async def metrics(self, request: web.Request) -> web.Response:
        self._observe()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
