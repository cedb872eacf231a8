"""The mesh port: every inbound connection, from the TCP accept to an authenticated channel.

Before authentication a connection is bounded by the pre-auth guard (deadline from the accept, per-source
and total caps), the per-source handshake rate limit and ``mesh.max_peers``; after its Noise handshake it
is handed to the connection registry (gossip) or served for the operator API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from protocol.channel import ConnectionKind, HandshakeRateLimiter
from protocol.errors import MeshError

from .. import transport
from ..config import LoadedConfig
from ..metrics import Metrics
from ..transport import MESH_PATH, WS_MAX_MSG_BYTES, Conn
from .connections import ConnectionRegistry
from .logs import LogBudget
from .operator_api import OperatorApi
from .tasks import TaskSpawner


class MeshListener:
    def __init__(self, *, config: LoadedConfig, connections: ConnectionRegistry, operator_api: OperatorApi,
                 tasks: TaskSpawner, metrics: Metrics, log: Any, log_budget: LogBudget,
                 alert: Callable[[str, dict[str, Any]], None],
                 on_bad_handshake: Callable[[str, str], None] = lambda source, reason: None) -> None:
        mesh = config.cfg.mesh
        self.config = config  # replaced on reload
        self._connections = connections
        self._operator_api = operator_api
        self._tasks = tasks
        self._metrics = metrics
        self._log = log
        self._log_budget = log_budget
        self._alert = alert
        self._on_bad_handshake = on_bad_handshake  # (source, reason): the abuse check counts these
        self._limiter = HandshakeRateLimiter(
            mesh.handshake_rate_per_s, mesh.handshake_burst, total_rate_per_s=mesh.handshake_rate_per_s * 10
        )
        self.preauth = transport.PreauthGuard(
            deadline_s=mesh.handshake_timeout_ms / 1000, per_source=mesh.preauth_per_source,
            total=mesh.preauth_max, on_refuse=self._preauth_refused,
        )

    def server(self) -> transport.GuardedServer:
        """aiohttp's low-level server (one route): every accepted socket is reported to the guard, which
        aborts it unless it authenticates within the handshake deadline, measured from the accept."""
        return transport.GuardedServer(self._request, guard=self.preauth, access_log=None,
                                       keepalive_timeout=self.preauth.deadline_s, max_line_size=1024,
                                       max_field_size=1024, max_headers=32)

    def _preauth_refused(self, source: str, reason: str) -> None:
        self._metrics.handshakes.labels("refused", reason).inc()
        self._on_bad_handshake(source, reason)
        if self._log_budget.allow(f"handshake.refused/{reason}", transport.now_ms()):
            self._log.info("handshake.refused", remote=source, reason=reason,
                           suppressed=self._log_budget.take_suppressed(f"handshake.refused/{reason}"))

    async def _request(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every HTTP request on the mesh port. Whatever goes wrong in one lands in the JSON log and
        the metrics and costs only that connection."""
        if request.path != MESH_PATH or request.method != "GET":
            self._metrics.handshakes.labels("refused", "not_found").inc()
            return web.Response(status=404, text="not found\n")
        try:
            return await self._upgrade(request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a bug hit by one request costs that request
            self._metrics.handshakes.labels("failed", "internal_error").inc()
            self._alert("node.internal_error", {"remote": request.remote or "?",
                                                "error": f"{type(exc).__name__}: {exc}"[:300]})
            self._log.error("request.failed", remote=request.remote or "?", exc_info=exc)
            raise web.HTTPInternalServerError() from None

    async def _upgrade(self, request: web.BaseRequest) -> web.StreamResponse:
        source = request.remote or "?"
        if not self._limiter.allow(source, transport.now_ms()):
            self._metrics.handshakes.labels("refused", "rate_limited").inc()
            self._on_bad_handshake(source, "rate_limited")
            return web.Response(status=429, text="handshake rate limit\n")
        if self._connections.total() >= self.config.cfg.mesh.max_peers:
            self._metrics.handshakes.labels("refused", "too_many_peers").inc()
            return web.Response(status=503, text="too many peers\n")
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MSG_BYTES, autoping=True)
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp's ClientConnectionResetError is a ConnectionResetError
            # The peer reset during the upgrade ("Cannot write to closing transport"): a refusal, counted
            # and logged like any other, not an aiohttp traceback.
            self._preauth_refused(source, "reset_during_upgrade")
            self._log.debug("handshake.reset", remote=source, detail=str(exc)[:200])
            return ws
        conn = Conn(ws=ws, session=self._connections.new_session(initiator=False), inbound=True, address=source)
        handshaking = self._connections.handshaking
        handshaking.add(conn)
        try:
            await transport.handshake(conn, self._connections.on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            reason = transport.refusal_reason(exc)
            self._metrics.handshakes.labels("refused", reason).inc()
            self._on_bad_handshake(source, reason)
            if self._log_budget.allow(f"handshake.refused/{reason}", transport.now_ms()):
                self._log.info("handshake.refused", remote=source, reason=reason, detail=str(exc)[:200],
                               suppressed=self._log_budget.take_suppressed(f"handshake.refused/{reason}"))
            await transport.close(conn, reason, refused=True)
            return ws
        finally:
            handshaking.discard(conn)
        self.preauth.authenticated(request.protocol)
        self._metrics.handshakes.labels("ok", "inbound").inc()
        if not self._tasks.serving:
            # Listening but not serving (still starting, or stopping): registering the channel now
            # would leave it in the registry with no reader or writer, swallowing every send to that peer.
            await transport.close(conn, "node not serving")
            return ws
        if conn.kind is ConnectionKind.OPERATOR:
            await self._connections.serve_operator(conn, self._operator_api.handle)
        else:
            await self._connections.serve_gossip(conn)
        return ws
