"""The node's constant validation, wired into the daemon: expiry lead times, the port audit, handshake
abuse and port scans (the checks themselves are in ``meshnode/checks``; their findings go to the alert
pipeline, one trigger and one resolve per episode)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog

from protocol.errors import MeshError
from protocol.trust import TrustedState

from ..checks.local import ABUSE, PORT_AUDIT, PORT_SCAN, LocalChecks
from ..checks.local import deliver as deliver_findings
from ..checks.port_scan import list_argv, record_sets
from ..config import LoadedConfig
from ..enforcer import Enforcer
from ..identity import Identity
from ..metrics import Metrics
from .alerts import EXPIRY_CHECK_S, AlertSender
from .scheduler import Deadline, Every, Scheduler
from .tasks import TaskSpawner

PORT_SCAN_POLL_S = 10.0  # how often the dropped_* sets are listed (they hold a window of 60 s by default)


class Validation:
    def __init__(self, *, config: LoadedConfig, identity: Identity, trust: TrustedState, enforcer: Enforcer,
                 alerts: AlertSender, tasks: TaskSpawner, scheduler: Scheduler, mesh_port: int, mesh_udp: bool,
                 metrics: Metrics,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.config = config
        self.identity = identity
        self.trust = trust
        self.enforcer = enforcer
        self.alerts = alerts
        self.tasks = tasks
        self.scheduler = scheduler
        self.mesh_port = mesh_port
        self.metrics = metrics
        self.log = log
        self.checks = LocalChecks(config.cfg.validate, table=config.cfg.enforce.table, mesh_port=mesh_port,
                                  mesh_udp=mesh_udp)
        self.checks.restore_port_scans([(a.subject, a.summary) for a in alerts.pipeline.open_alerts()
                                        if a.check == PORT_SCAN], time.monotonic())
        self._scanning = False

    def schedule(self) -> None:
        """Its timer-driven jobs, on the daemon's one scheduler."""
        validate = self.config.cfg.validate
        self.scheduler.add(Every("alert-expiry", EXPIRY_CHECK_S, self.check_expiry))
        if validate.port_audit_s:
            self.scheduler.add(Every("port-audit", validate.port_audit_s, self._start_port_audit))
        self.scheduler.add(Deadline("abuse-quiet", self.checks.next_abuse_deadline, self._abuse_round))
        self.scheduler.add(Every("port-scan", PORT_SCAN_POLL_S, self._start_port_scan))

    def reconfigure(self, config: LoadedConfig, *, mesh_udp: bool) -> None:
        self.config = config
        self.checks.reconfigure(config.cfg.validate, table=config.cfg.enforce.table, mesh_port=self.mesh_port,
                                mesh_udp=mesh_udp)

    def check_expiry(self) -> None:
        """Certificate and policy expiry, with lead times (warning at 25% of validity left, critical at expiry)."""
        wall = time.time()
        self.alerts.check_expiry(self.identity.cert, self.trust.policy, self.trust.policy_state(wall), wall)

    # -- port audit -----------------------------------------------------------------------------------
    def _start_port_audit(self) -> None:
        self.tasks.spawn(self._port_audit())

    async def _port_audit(self) -> None:
        """One audit off the event loop (it walks /proc/*/fd), its changes raised and resolved."""
        backend = self.enforcer.backend
        try:
            changes = await asyncio.to_thread(self.checks.port_audit, backend.applied if backend else None)
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a failed audit must not end the TaskGroup
            self.metrics.internal_errors.labels("checks.port_audit").inc()
            self.log.warning("checks.port_audit_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            return
        deliver_findings(self.alerts.pipeline, PORT_AUDIT, changes, time.time())
        self.scheduler.wake()

    # -- handshake abuse ----------------------------------------------------------------------------------
    def on_bad_handshake(self, source: str, reason: str) -> None:
        """A failed or refused handshake: the abuse check counts it; an episode that opens is raised at
        once (one alert per episode, not per attempt) and, with blocking on, the source is dropped for a
        while in the nftables timeout set."""
        backend = self.enforcer.backend
        opened = self.checks.episodes_opened
        argv = self.checks.bad_handshake(source, reason, backend.applied if backend else None, time.monotonic())
        if self.checks.episodes_opened != opened:
            self._abuse_round()
            self.scheduler.wake()
        if argv and backend is not None:
            self.tasks.spawn(self._block(backend, source, argv))

    async def _block(self, backend: Any, source: str, argv: list[str]) -> None:
        runner = getattr(backend, "runner", None)
        if runner is None:
            return
        try:
            proc = await asyncio.to_thread(runner.run, argv, check=False)
        except (MeshError, OSError) as exc:
            self.log.warning("checks.block_failed", source=source, error=str(exc)[:200])
            return
        self.log.warning("checks.source_blocked", source=source, seconds=self.config.cfg.validate.block_abusers_s,
                         exit=proc.returncode)

    def _abuse_round(self) -> None:
        deliver_findings(self.alerts.pipeline, ABUSE, self.checks.abuse_round(time.monotonic()), time.time())

    # -- port scans ---------------------------------------------------------------------------------------
    def _start_port_scan(self) -> None:
        if not self._scanning:  # one listing at a time, however slow nft is
            self._scanning = True
            self.tasks.spawn(self._port_scan())

    async def _port_scan(self) -> None:
        """List the ``dropped_*`` sets off the event loop, raise new scanning sources, resolve quiet ones,
        block the new ones when blocking is on. A failed listing changes nothing (no resolve on failure)."""
        try:
            backend = self.enforcer.backend
            ruleset = backend.applied if backend is not None else None
            runner = getattr(backend, "runner", None)
            names = record_sets(ruleset) if runner is not None and self.checks.scan_detector is not None else []
            try:
                listings = await asyncio.to_thread(self._list_sets, runner, getattr(backend, "nft", "nft"), names)
            except Exception as exc:  # noqa: BLE001 - the bulkhead: a failed listing must not end the TaskGroup
                self.metrics.internal_errors.labels("checks.port_scan").inc()
                self.log.warning("checks.port_scan_failed", error=f"{type(exc).__name__}: {exc}"[:200])
                return
            unreadable = self.checks.unreadable_elements
            changes, blocks = self.checks.port_scan_round(listings, ruleset, time.monotonic())
            if self.checks.unreadable_elements != unreadable:
                self.metrics.internal_errors.labels("checks.port_scan_element").inc(
                    self.checks.unreadable_elements - unreadable)
            deliver_findings(self.alerts.pipeline, PORT_SCAN, changes, time.time())
            for f in changes.raised:
                self.log.warning("checks.port_scan", source=f.subject, ports=f.details.get("ports"))
            for source, argv in blocks:
                await self._block(backend, source, argv)
            if changes.raised or changes.resolved:
                self.scheduler.wake()
        finally:
            self._scanning = False

    def _list_sets(self, runner: Any, nft: str, names: list[str]) -> list[Any]:
        out = []
        for name in names:
            proc = runner.run(list_argv(self.checks.table, name, nft), check=True)
            out.append(json.loads(proc.stdout))
        return out
