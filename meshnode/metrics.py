"""Prometheus metrics of one daemon, in its own registry (no module-level state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from protocol.trust import TrustedState


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.policy_serial = Gauge("policymesh_policy_serial", "Serial of the trusted policy", registry=r)
        self.applied_serial = Gauge("policymesh_enforced_serial", "Serial enforced in the kernel", registry=r)
        self.policy_state = Gauge("policymesh_policy_state", "1 for the current state", ["state"], registry=r)
        self.policy_expires = Gauge("policymesh_policy_expires_timestamp_seconds", "Policy expiry", registry=r)
        self.convergence_lag = Gauge(
            "policymesh_convergence_lag", "Seconds since this node trusted the newest policy it knows, while it "
            "does not enforce it yet (0 when it enforces what it trusts)", registry=r
        )
        self.peers = Gauge("policymesh_peers", "Peers: state=connected has an open gossip channel; the other "
                           "states count the other members by liveness", ["state"], registry=r)
        self.connections = Gauge("policymesh_connections", "Open authenticated channels", ["kind"], registry=r)
        self.handshakes = Counter("policymesh_handshakes", "Handshakes by outcome", ["result", "reason"], registry=r)
        self.frames_refused = Counter("policymesh_frames_refused", "Frames/messages refused", ["reason"], registry=r)
        self.policies_refused = Counter("policymesh_policies_refused", "Policy inputs refused", ["reason"], registry=r)
        self.bytes = Counter("policymesh_bytes", "Mesh bytes on the wire", ["direction"], registry=r)
        self.datagrams = Counter("policymesh_datagrams", "Encrypted gossip datagrams by event (sent, received, "
                                 "retransmit, fallback to the stream, duplicate, path_blocked, ...)", ["event"],
                                 registry=r)
        self.apply_seconds = Histogram(
            "policymesh_apply_seconds", "Render+apply latency", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.apply_failures = Counter("policymesh_apply_failures", "Failed enforcement applies", registry=r)
        self.drift = Counter("policymesh_drift_repairs", "Kernel ruleset drift detected and repaired", registry=r)
        self.alerts = Counter("policymesh_alerts", "Alerts raised", ["event"], registry=r)
        self.peer_probes = Counter("policymesh_peer_probes", "Ports of peers probed from outside, by verdict "
                                   "(ok, hole, blocked, no_listener, unknown)", ["verdict"], registry=r)
        self.overrides = Gauge("policymesh_override_active", "Active security overrides", ["override"], registry=r)
        self.state_problems = Counter("policymesh_state_problems", "Corrupt or unverifiable state files", registry=r)
        self.state_write_failures = Counter(
            "policymesh_state_write_failures", "State writes that failed (kept pending and retried)", ["kind"],
            registry=r,
        )
        self.state_unsaved = Gauge(
            "policymesh_state_unsaved", "Accepted state not yet durable (pending writes)", registry=r
        )
        self.internal_errors = Counter(
            "policymesh_internal_errors", "Failures handled without stopping the daemon, by where", ["where"],
            registry=r,
        )
        self.library_log_records = Counter(
            "policymesh_library_log_records", "Warnings and errors logged by aiohttp and asyncio", ["logger", "level"],
            registry=r,
        )
        self.alerts_open = Gauge(
            "policymesh_alerts_open", "Open alerts (condition holds) by check and severity", ["check", "severity"],
            registry=r,
        )
        self.alert_deliveries = Counter(
            "policymesh_alert_deliveries", "Alert event posts by destination and result (delivered, failed: "
            "retried later, rejected: dropped after a 4xx)", ["destination", "result"], registry=r,
        )
        self.alert_outbox_events = Gauge(
            "policymesh_alert_outbox_events", "Alert events not yet taken by every destination", registry=r
        )
        self.alert_outbox_dropped = Counter(
            "policymesh_alert_outbox_dropped", "Alert events dropped because the outbox was full", registry=r
        )

    def set_open_alerts(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace every ``policymesh_alerts_open`` sample (closed alerts leave no stale series)."""
        self.alerts_open.clear()
        for (check, severity), n in counts.items():
            self.alerts_open.labels(check, severity).set(n)

    def observe_peers(self, connected: int, members: list[dict[str, Any]], self_id: str) -> None:
        """Set ``policymesh_peers`` from the connection registry and the member table (self excluded)."""
        self.peers.clear()
        self.peers.labels("connected").set(connected)
        for m in members:
            if m.get("node_id") != self_id and m.get("liveness"):
                self.peers.labels(str(m["liveness"])).inc()

    def observe_policy(self, trust: TrustedState, now: float) -> None:
        """Set the policy gauges (serial, expiry, state) from the trusted state at wall time ``now``."""
        policy = trust.policy
        self.policy_serial.set(trust.serial)
        if policy is not None:
            self.policy_expires.set(policy.expires_at)
        state = trust.policy_state(now)
        for name in ("none", "fresh", "stale"):
            self.policy_state.labels(name).set(1 if name == state else 0)
