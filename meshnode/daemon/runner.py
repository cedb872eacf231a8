"""meshnode: the asyncio shell around the sans-IO gossip node, wired from its parts.

Lifecycle (hypercorn / aiohttp web_runner style): set up in phases — identity and trust, stored state,
enforcement of the last-known-good policy (before any peer is reachable), the gossip node, listeners —
then run every task in one TaskGroup until SIGTERM (the signal handler only sets an event); clean up in
reverse in ``finally``. Every timer-driven job runs from the one scheduler. Under systemd the daemon says
when it is ready, what it enforces, that it is alive (the watchdog) and that it stops (``readiness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from protocol.errors import MeshError
from protocol.gossip import LeaveRequested, RulesetApplied
from protocol.trust import TrustedState

from ..alerting import AlertPipeline
from ..config import ConfigError, LoadedConfig, load_config, split_hostport
from ..enforcer import Enforcer
from ..identity import Identity, load_identity
from ..metrics import Metrics
from ..sdnotify import Notifier
from ..sources import DropDirSource, UrlSource
from ..state import StateStore
from . import boot
from .admin_http import AdminHttp
from .alerts import AlertSender
from .connections import ConnectionRegistry
from .core_driver import CoreDriver
from .effects import EffectExecutor
from .logs import LibraryLogCounter, LogBudget
from .mesh_listener import MeshListener
from .operator_api import OperatorApi
from .peer_checks import REACHABILITY_ROUND_S, PeerChecks
from .readiness import Readiness
from .ruleset_watch import RulesetWatch
from .scheduler import Deadline, Every, Scheduler
from .state_writes import StateWriter
from .status import DaemonStatus
from .tasks import TaskSpawner
from .validation import Validation

SHUTDOWN_GRACE_S = 2.0
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
ENFORCE_RETRY_MAX_S = 10.0
REVALIDATE_INTERVAL_S = 30.0
DIAL_CONNECT_TIMEOUT_S = 3


class MeshDaemon:
    def __init__(self, config: LoadedConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        cfg = config.cfg
        self.metrics = Metrics()
        self.log = structlog.get_logger("meshnode").bind(node=cfg.node.id)
        self.identity: Identity = load_identity(
            config.resolve(cfg.identity.cert),
            config.resolve(cfg.identity.identity_key),
            config.resolve(cfg.identity.static_key),
            config.resolve(cfg.trust.root),
        )
        if self.identity.node_id != cfg.node.id:
            raise ConfigError(f"{config.path}: node.id {cfg.node.id!r} but the certificate is for "
                              f"{self.identity.node_id!r}")
        self.trust = TrustedState(self.identity.anchor, skew_s=cfg.trust.clock_skew_s)
        self.store = StateStore(config.resolve(cfg.node.data_dir))
        self.listen_host, self.listen_port = split_hostport(cfg.mesh.listen, "mesh.listen")
        self.advertise = cfg.mesh.advertise or cfg.mesh.listen
        self.overrides = config.active_overrides()
        self.tasks = TaskSpawner()
        self.scheduler = Scheduler()
        self.readiness = Readiness(notifier if notifier is not None else Notifier(), self.log)
        log_budget = LogBudget(per_s=2.0, burst=10)
        try:
            pipeline = AlertPipeline.from_config(config, self.identity.node_id, log=self.log, metrics=self.metrics)
        except OSError as exc:
            raise ConfigError(f"{config.path}: the alert outbox in node.data_dir: {exc.strerror or exc}") from None
        self.alerts = AlertSender(pipeline, self.metrics, self.log, wake=self.scheduler.wake)
        self.enforcer = Enforcer(config, self.identity, self.trust, self.metrics, self.log, self._on_ruleset_applied,
                                 self.alerts.alert,
                                 pushes_delivered=lambda s: self.connections.datagrams.bodies_delivered(s))
        self.state = StateWriter(self.trust, self.metrics, self.log, log_budget, self.alerts.alert)
        self.core = CoreDriver(self.tasks, self.metrics, self.log, wake=self.scheduler.wake)
        parts: dict[str, Any] = dict(metrics=self.metrics, log=self.log)
        self.connections = ConnectionRegistry(config=config, identity=self.identity, trust=self.trust,
                                              core=self.core, tasks=self.tasks, log_budget=log_budget,
                                              alert=self.alerts.alert, **parts)
        self.report = DaemonStatus(identity=self.identity, trust=self.trust, enforcer=self.enforcer,
                                   connections=self.connections, core=self.core, alerts=self.alerts,
                                   metrics=self.metrics, overrides=lambda: self.overrides)
        operator_api = OperatorApi(submit_policy=self.core.submit_policy, not_durable=self.state.not_durable,
                                   status=self.report.status,
                                   alerts=self.report.open_alerts, **parts)
        self.validation = Validation(config=config, identity=self.identity, trust=self.trust, enforcer=self.enforcer,
                                     alerts=self.alerts, tasks=self.tasks, scheduler=self.scheduler,
                                     mesh_port=self.listen_port, mesh_udp=cfg.mesh.datagrams, **parts)
        self.peer_checks = PeerChecks(config=config, identity=self.identity, enforcer=self.enforcer, core=self.core,
                                      pipeline=pipeline, tasks=self.tasks, skew_s=cfg.trust.clock_skew_s, **parts)
        self.listener = MeshListener(config=config, connections=self.connections, operator_api=operator_api,
                                     tasks=self.tasks, log_budget=log_budget, alert=self.alerts.alert,
                                     on_bad_handshake=self.validation.on_bad_handshake, **parts)
        self.admin = AdminHttp(status=self.report.status, alerts=self.report.open_alerts, enforcer=self.enforcer,
                               trust=self.trust, metrics=self.metrics, observe=self.report.observe)
        self.effects = EffectExecutor(trust=self.trust, store=self.store, state=self.state, enforcer=self.enforcer,
                                      connections=self.connections, origin=lambda: self.core.origin,
                                      alert=self.alerts.alert, **parts)
        self._enforce_retry_s = RESTART_MIN_S
        self._stop = asyncio.Event()
        self._runners: list[web.BaseRunner] = []
        self._sources: list[DropDirSource | UrlSource] = []
        self.bound_mesh_port: int | None = None
        self.bound_admin_port: int | None = None

    # -- phases ---------------------------------------------------------------------------------------
    def load_state(self) -> boot.StoredMembers:
        return boot.load_state(trust=self.trust, store=self.store, identity=self.identity, metrics=self.metrics,
                               log=self.log, alert=self.alerts.alert)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                             (signal.SIGHUP, self._reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        for name in self.overrides:
            self.metrics.overrides.labels(name).set(1)
            self.log.warning("config.override_active", override=name)
        library_logs = LibraryLogCounter(self.metrics)
        library_logs.install()
        try:
            await self._run()
        finally:
            library_logs.uninstall()

    async def _run(self) -> None:
        stored = self.load_state()
        # Enforce the last-known-good policy before any peer is reachable.
        await self.enforcer.setup()
        if self.trust.policy is not None:
            await self.enforcer.apply_now(self.trust.policy, list(stored.certificates.values()),
                                          self.trust.policy_hash or "")
        self.metrics.observe_policy(self.trust, time.time())
        self.validation.check_expiry()
        self.core.start(boot.make_node(config=self.config, trust=self.trust, identity=self.identity,
                                       advertise=self.advertise, known_members=stored.entries,
                                       enforcer=self.enforcer),
                        self.effects.execute)
        source = self.config.cfg.mesh.source_address
        connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None, limit=0)
        http = aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=DIAL_CONNECT_TIMEOUT_S))
        self.connections.http = http
        try:
            await self._start_listeners()
            self.log.info("meshnode.started", mesh=f"{self.listen_host}:{self.bound_mesh_port}",
                          admin=self.config.cfg.admin.listen if self.config.cfg.admin.enabled else None,
                          backend=self.enforcer.backend_name, overrides=self.overrides)
            async with asyncio.TaskGroup() as tg:
                self.tasks.open(tg)
                self._schedule_jobs()
                tg.create_task(self.scheduler.run(), name="scheduler")
                tg.create_task(self._supervised("enforcer", self.enforcer.run), name="enforcer")
                tg.create_task(self._supervised("drift", self.enforcer.drift_loop), name="drift")
                tg.create_task(self.alerts.pipeline.deliver(http), name="alert-delivery")
                if self.enforcer.backend_name == "nftables":
                    watch = RulesetWatch(self.config.cfg.enforce.table, self.enforcer.check_drift_soon, self.log)
                    tg.create_task(watch.run(), name="ruleset-watch")
                self._start_sources(tg)
                self.core.fire_timer()
                self.readiness.started(self.trust.policy, self.enforcer.last_error)
                await self._stop.wait()
                await self._leave()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            self.tasks.close()
            self.alerts.pipeline.flush()
            await self.connections.close_all("node shutting down")
            self.connections.datagrams.close()
            for runner in reversed(self._runners):
                await runner.cleanup()
            await http.close()
            self.log.info("meshnode.stopped")
            self.readiness.close()

    async def _start_listeners(self) -> None:
        cfg = self.config.cfg
        # shutdown_timeout bounds how long a stop waits for handlers (e.g. a peer stalling its handshake).
        mesh = web.ServerRunner(self.listener.server(), handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
        self.bound_mesh_port = await self._listen(mesh, self.listen_host, self.listen_port)
        if cfg.mesh.datagrams:
            await self.connections.datagrams.start(self.listen_host, self.bound_mesh_port)
        if cfg.admin.enabled:
            host, port = split_hostport(cfg.admin.listen, "admin.listen")
            admin = web.AppRunner(self.admin.app(), access_log=None, handle_signals=False,
                                  shutdown_timeout=SHUTDOWN_GRACE_S)
            self.bound_admin_port = await self._listen(admin, host, port)

    async def _listen(self, runner: web.BaseRunner, host: str, port: int) -> int:
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        return _bound_port(runner) or port

    def _start_sources(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.config.cfg
        if cfg.sources.drop_dir:
            drop_dir = DropDirSource(self.config, self.core.submit_policy, self.log)
            self._sources.append(drop_dir)
            tg.create_task(drop_dir.run(), name="drop-dir")
        if cfg.sources.urls:
            assert self.connections.http is not None
            urls = UrlSource(self.config, self.connections.http, self.core.submit_policy, self.log)
            self._sources.append(urls)
            tg.create_task(urls.run(), name="url-poll")

    def _schedule_jobs(self) -> None:
        """The timer-driven jobs, in the order they run when due at once."""
        watchdog = self.readiness.watchdog_job()
        if watchdog is not None:
            self.scheduler.add(watchdog)
        self.scheduler.add(Deadline("state-write-retry", lambda: self.state.retry_at, self.state.retry))
        self.scheduler.add(Deadline("core-timer", self.core.next_deadline_s, self.core.fire_timer))
        datagrams = self.connections.datagrams
        self.scheduler.add(Deadline("datagram-timer", datagrams.next_deadline, datagrams.tick))
        self.scheduler.add(Every("enforce-retry", RESTART_MIN_S, self._retry_enforcement))
        self.scheduler.add(Every("revalidate", REVALIDATE_INTERVAL_S, self._revalidate))
        self.scheduler.add(Deadline("alert-timer", self.alerts.next_deadline_monotonic, self.alerts.handle_timer))
        self.validation.schedule()
        self.scheduler.add(Every("peer-probe", self.peer_checks.next_interval_s(), self.peer_checks.probe_round))
        self.scheduler.add(Every("reachability", REACHABILITY_ROUND_S, self.peer_checks.reachability_round))

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived task; an OS-level failure (EMFILE, ENOSPC, no thread for to_thread) restarts it
        after a backoff instead of ending the TaskGroup and the daemon. The enforcer re-applies the
        trusted policy when it comes back, so trusted and enforced do not stay apart."""
        backoff_s = RESTART_MIN_S
        while True:
            try:
                await run()
                return
            except (OSError, RuntimeError, MeshError) as exc:
                self.metrics.internal_errors.labels(f"task.{name}").inc()
                self.log.error("task.failed", task=name, error=f"{type(exc).__name__}: {exc}"[:300],
                               restart_in_s=backoff_s)
                self.alerts.alert("node.task_failed", {"task": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                await asyncio.sleep(backoff_s)
                backoff_s = min(RESTART_MAX_S, backoff_s * 2)
                if name == "enforcer":
                    self.enforcer.want_again()

    def request_stop(self) -> None:
        self.log.info("meshnode.stopping")
        self.readiness.stopping()
        self._stop.set()

    async def _leave(self) -> None:
        self.core.feed(LeaveRequested())
        # Give the leave announcement a moment to reach peers.
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while time.monotonic() < deadline and not self.connections.queues_empty():
            await asyncio.sleep(0.05)

    def _reload(self) -> None:
        """SIGHUP: re-read the config and re-apply the enforced policy at once (also when the config does
        not load): a reload of nftables.service flushes the whole ruleset and propagates here."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            self.log.error("config.reload_failed", reason=str(exc), kept="running configuration")
            self.enforcer.want_again()
            return
        restart_needed = [s for s in ("node", "identity", "trust", "mesh", "admin", "gossip", "alerts")
                          if getattr(new.cfg, s) != getattr(self.config.cfg, s)]
        self.config = self.connections.config = self.listener.config = new
        old_overrides, self.overrides = self.overrides, new.active_overrides()
        for name in set(old_overrides) | set(self.overrides):
            self.metrics.overrides.labels(name).set(1 if name in self.overrides else 0)
        for name in set(self.overrides) - set(old_overrides):
            self.log.warning("config.override_active", override=name)
        self.enforcer.reconfigure(new)
        self.validation.reconfigure(new, mesh_udp=self.connections.datagrams.bound is not None)
        self.peer_checks.reconfigure(new)
        for source in self._sources:
            source.reconfigure(new)
        self.enforcer.want_again()
        self.log.info("config.reloaded", needs_restart=restart_needed, overrides=self.overrides)

    # -- jobs and callbacks -------------------------------------------------------------------------------
    def _retry_enforcement(self) -> float:
        """A failed apply (EMFILE, ENOSPC, a busy kernel) keeps the previous ruleset; retry it with backoff
        until the kernel enforces what the node trusts, so trusted and enforced do not stay apart."""
        wanted = self.enforcer.wanted
        if wanted is None or self.enforcer.last_error is None:
            self._enforce_retry_s = RESTART_MIN_S
            return self._enforce_retry_s
        self.log.info("enforce.retry", serial=wanted[0].serial, last_error=self.enforcer.last_error[:200])
        self.enforcer.want_again()
        self._enforce_retry_s = min(ENFORCE_RETRY_MAX_S, self._enforce_retry_s * 2)
        return self._enforce_retry_s

    def _revalidate(self) -> None:
        """Certificates expire while channels are open: re-check every open channel periodically."""
        self.connections.revalidate()
        self.metrics.observe_policy(self.trust, time.time())

    def _on_ruleset_applied(self, serial: int, ruleset_hash: str, policy_hash: str) -> None:
        self.metrics.applied_serial.set(serial)
        self.readiness.enforced(serial, policy_hash, self.enforcer.applied_members)
        if self.core.node is not None:
            self.core.feed(RulesetApplied(serial=serial, ruleset_hash=ruleset_hash, policy_hash=policy_hash))


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a clean stop."""


def _bound_port(runner: web.BaseRunner) -> int | None:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None


def run_daemon(config_path: Path) -> int:
    import uvloop

    daemon = MeshDaemon(load_config(config_path))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run())
    return 0
