"""A strict local stand-in for PagerDuty's Events API v2 (``POST /v2/enqueue``) and for a webhook receiver.

It validates what PagerDuty documents ("Send an Alert Event", Events API v2 overview): top-level
``routing_key`` (32 characters), ``event_action`` (trigger|acknowledge|resolve), ``dedup_key`` (at most 255
characters; required to acknowledge or resolve), ``payload`` for a trigger with ``summary`` (non-empty, at
most 1024 characters), ``source`` (non-empty), ``severity`` (critical|error|warning|info), optional
``timestamp`` (ISO 8601), ``component``, ``group``, ``class`` (strings) and ``custom_details`` (an
object), plus optional ``client``, ``client_url``, ``images``, ``links``; bodies at most 512 KB. Being
stricter than PagerDuty, it refuses unknown fields (top level and payload) with 400. It answers like
PagerDuty: 202 ``{"status": "success", "message": "Event processed", "dedup_key": ...}`` or 400
``{"status": "invalid event", "message": "Event object is invalid", "errors": [...]}``.

``/webhook`` validates the policymesh webhook schema (meshnode/alerting/webhook.py) the same way.
Tests can queue forced answers (``force``: 500, 429, 400...) to play an unhealthy receiver.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

MAX_BODY_BYTES = 512 * 1024
TOP_LEVEL = {"routing_key", "event_action", "dedup_key", "payload", "images", "links", "client", "client_url"}
PAYLOAD_FIELDS = {"summary", "source", "severity", "timestamp", "component", "group", "class", "custom_details"}
SEVERITIES = {"critical", "error", "warning", "info"}
ACTIONS = {"trigger", "acknowledge", "resolve"}
WEBHOOK_FIELDS: dict[str, type | tuple[type, ...]] = {"schema": str, "action": str, "dedup_key": str, "cluster": str, "node": str, "check": str,
                  "subject": str, "severity": str, "summary": str, "details": dict, "at": str,
                  "at_unix": (int, float), "first": bool}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iso8601(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def pagerduty_errors(body: Any) -> list[str]:
    """Everything wrong with an Events v2 alert event ([] when valid)."""
    if not isinstance(body, dict):
        return ["the event must be a JSON object"]
    errors = [f"unknown field {k!r}" for k in sorted(set(body) - TOP_LEVEL)]
    key = body.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        errors.append("Length of 'routing_key' is incorrect (should be 32 characters)")
    action = body.get("event_action")
    if action not in ACTIONS:
        errors.append(f"'event_action' must be one of {sorted(ACTIONS)}, got {action!r}")
    dedup = body.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or not dedup or len(dedup) > 255):
        errors.append("'dedup_key' must be a non-empty string of at most 255 characters")
    if action in ("acknowledge", "resolve") and dedup is None:
        errors.append(f"'dedup_key' is required to {action}")
    for name in ("client", "client_url"):
        if name in body and not isinstance(body[name], str):
            errors.append(f"{name!r} must be a string")
    for name in ("images", "links"):
        if name in body and not (isinstance(body[name], list) and all(isinstance(x, dict) for x in body[name])):
            errors.append(f"{name!r} must be an array of objects")
    payload = body.get("payload")
    if action == "trigger" and payload is None:
        errors.append("'payload' is required to trigger")
    if payload is not None:
        errors += _payload_errors(payload)
    return errors


def _payload_errors(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return ["'payload' must be an object"]
    errors = [f"unknown payload field {k!r}" for k in sorted(set(payload) - PAYLOAD_FIELDS)]
    summary = payload.get("summary")
    if not isinstance(summary, str) or not summary or len(summary) > 1024:
        errors.append("'payload.summary' must be a non-empty string of at most 1024 characters")
    if not isinstance(payload.get("source"), str) or not payload["source"]:
        errors.append("'payload.source' must be a non-empty string")
    if payload.get("severity") not in SEVERITIES:
        errors.append(f"'payload.severity' must be one of {sorted(SEVERITIES)}, got {payload.get('severity')!r}")
    if "timestamp" in payload and not _iso8601(payload["timestamp"]):
        errors.append(f"'payload.timestamp' is not ISO 8601: {payload['timestamp']!r}")
    for name in ("component", "group", "class"):
        if name in payload and not isinstance(payload[name], str):
            errors.append(f"'payload.{name}' must be a string")
    if "custom_details" in payload and not isinstance(payload["custom_details"], dict):
        errors.append("'payload.custom_details' must be an object")
    return errors


def webhook_errors(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return ["the body must be a JSON object"]
    errors = [f"unknown field {k!r}" for k in sorted(set(body) - set(WEBHOOK_FIELDS))]
    errors += [f"{k!r} missing or not {t}" for k, t in WEBHOOK_FIELDS.items() if not isinstance(body.get(k), t)]
    if body.get("schema") != "policymesh.alert/v1":
        errors.append("'schema' must be policymesh.alert/v1")
    if body.get("action") not in ("trigger", "resolve"):
        errors.append("'action' must be trigger or resolve")
    if body.get("severity") not in SEVERITIES:
        errors.append("'severity' must be a PagerDuty severity")
    if not _iso8601(body.get("at")):
        errors.append("'at' is not ISO 8601")
    return errors


@dataclass
class Receiver:
    """Accepted events in arrival order (``events``: PagerDuty, ``webhooks``: webhook bodies); every request
    (``requests``: (path, status)); ``force``: statuses to answer next, whatever the body."""

    port: int = 0
    host: str = "127.0.0.1"
    events: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, int]] = field(default_factory=list)
    rejected: list[tuple[Any, list[str]]] = field(default_factory=list)
    force: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def pagerduty_url(self) -> str:
        return f"http://{self.host}:{self.port}/v2/enqueue"

    @property
    def webhook_url(self) -> str:
        return f"http://{self.host}:{self.port}/webhook"

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v2/enqueue", self._enqueue)
        app.router.add_post("/webhook", self._webhook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _read(self, request: web.Request) -> tuple[Any, list[str]]:
        if request.content_type != "application/json":
            return None, [f"Content-Type must be application/json, got {request.content_type!r}"]
        try:
            return json.loads(await request.read()), []
        except (ValueError, UnicodeDecodeError) as exc:
            return None, [f"not JSON: {exc}"]

    def _forced(self, path: str) -> web.Response | None:
        if not self.force:
            return None
        status = self.force.pop(0)
        self.requests.append((path, status))
        return web.json_response({"status": "forced", "message": "forced by the test"}, status=status)

    async def _enqueue(self, request: web.Request) -> web.Response:
        forced = self._forced("/v2/enqueue")
        if forced is not None:
            return forced
        body, errors = await self._read(request)
        errors = errors or pagerduty_errors(body)
        if errors:
            self.rejected.append((body, errors))
            self.requests.append(("/v2/enqueue", 400))
            return web.json_response({"status": "invalid event", "message": "Event object is invalid",
                                      "errors": errors}, status=400)
        self.events.append(body)
        self.requests.append(("/v2/enqueue", 202))
        return web.json_response({"status": "success", "message": "Event processed",
                                  "dedup_key": body.get("dedup_key") or "generated"}, status=202)

    async def _webhook(self, request: web.Request) -> web.Response:
        forced = self._forced("/webhook")
        if forced is not None:
            return forced
        body, errors = await self._read(request)
        errors = errors or webhook_errors(body)
        if errors:
            self.rejected.append((body, errors))
            self.requests.append(("/webhook", 400))
            return web.json_response({"errors": errors}, status=400)
        self.webhooks.append(body)
        self.requests.append(("/webhook", 200))
        return web.json_response({"ok": True})


async def _serve(host: str, port: int, dump: str) -> None:
    """Run until killed, rewriting ``dump`` (JSON: events, webhooks, rejected) after every request."""
    import os

    receiver = await Receiver(port=port, host=host).start()
    seen = -1
    while True:
        if len(receiver.requests) != seen:
            seen = len(receiver.requests)
            tmp = f"{dump}.tmp"
            with open(tmp, "w") as f:
                json.dump({"events": receiver.events, "webhooks": receiver.webhooks,
                           "rejected": [[b, e] for b, e in receiver.rejected]}, f)
            os.replace(tmp, dump)
        await asyncio.sleep(0.1)


if __name__ == "__main__":  # a receiver in a network namespace: python -m tests.pagerduty_receiver HOST PORT DUMP
    import sys

    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
