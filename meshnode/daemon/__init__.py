"""The daemon: the asyncio shell around the sans-IO gossip node, as parts with one-way dependencies.

runner.MeshDaemon            phased start, one TaskGroup, signals, reload, cleanup in reverse; wires the parts
boot                         stored state re-verified at start (roots, policy, member file); the gossip node built on it
core_driver.CoreDriver       feeds inputs to the node, hands its effects to the executor, submits policies
effects.EffectExecutor       the one place the core's effects run
scheduler.Scheduler          every timer-driven job (watchdog, state-write retry, core deadline, enforce retry,
                             revalidation)
connections.ConnectionRegistry  authenticated channels: register, serve, send, dial, limit, revalidate, close
mesh_listener.MeshListener   the mesh port: pre-auth bounds, rate limits, handshakes, hand-off
operator_api.OperatorApi     publish and status requests on operator channels
admin_http.AdminHttp         /healthz, /readyz, /v1/status, /metrics
status.DaemonStatus          the status document, open alerts, and the gauges read at scrape time
alerts.AlertSender           alerts: metrics, log, webhooks
readiness.Readiness          what systemd hears: READY once enforcing, STATUS lines, watchdog pings, STOPPING
state_writes.StateWriter     state writes retried with backoff when the disk fails
logs, tasks                  log budgets and library-log counts; the TaskGroup as the parts see it
"""

from .connections import OPERATOR_REQUEST_BYTES, channel_message_caps
from .runner import MeshDaemon, run_daemon

__all__ = ["OPERATOR_REQUEST_BYTES", "MeshDaemon", "channel_message_caps", "run_daemon"]
