"""What the node reports about itself: the status document and the gauges read at scrape time.

The operator API (``status``, ``alerts``) and the admin listener (``/v1/status``, ``/v1/alerts``,
``/metrics``) call these; they only read the parts (trust, enforcer, connections, the core's view),
never change them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from protocol.trust import TrustedState

from ..enforcer import Enforcer
from ..identity import Identity
from ..metrics import Metrics
from .alerts import AlertSender
from .connections import ConnectionRegistry
from .core_driver import CoreDriver, now


class DaemonStatus:
    def __init__(self, *, identity: Identity, trust: TrustedState, enforcer: Enforcer,
                 connections: ConnectionRegistry, core: CoreDriver, alerts: AlertSender, metrics: Metrics,
                 overrides: Callable[[], list[str]]) -> None:
        self._identity = identity
        self._trust = trust
        self._enforcer = enforcer
        self._connections = connections
        self._core = core
        self._alerts = alerts
        self._metrics = metrics
        self._overrides = overrides  # the active overrides of the running configuration (a reload changes them)
        self.started_at = time.time()

    def status(self) -> dict[str, Any]:
        """The node's status as the operator API and ``/v1/status`` show it."""
        current = now()
        core = self._core.node.status(current) if self._core.node is not None else {}
        trust = self._trust
        policy = trust.policy
        return {
            "node": self._identity.node_id,
            "region": self._identity.cert.region,
            "cluster": trust.cluster,
            "uptime_s": round(time.time() - self.started_at, 1),
            "root_version": trust.root_version,
            "policy": {
                "serial": trust.serial,
                "hash": trust.policy_hash,
                "expires_at": policy.expires_at if policy else None,
                "state": trust.policy_state(current.wall),
            },
            "enforcement": self._enforcer.status(),
            "overrides": self._overrides(),
            "connections": {"gossip": self._connections.gossip_count(), "operator": len(self._connections.operators)},
            "datagrams": self._connections.datagrams.status(),
            "cluster_view": core,
        }

    def open_alerts(self) -> list[dict[str, Any]]:
        """This node's open alerts (``/v1/alerts``, the operator request ``alerts``)."""
        return [a.to_dict() for a in self._alerts.pipeline.open_alerts()]

    def observe(self) -> None:
        """Gauges read at scrape time: policy, convergence lag, peers."""
        wall = time.time()
        self._metrics.observe_policy(self._trust, wall)
        lag = self._enforcer.lag_s(wall)
        self._metrics.convergence_lag.set(lag)
        summary = self._core.node.member_summary() if self._core.node is not None else []
        connected = sum(1 for channels in self._connections.gossip.values() if channels)
        self._metrics.observe_peers(connected,
                                    [{"node_id": n, "liveness": liveness} for n, _r, liveness, _a in summary],
                                    self._identity.node_id)
