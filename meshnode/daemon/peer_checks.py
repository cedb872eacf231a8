"""The daemon's side of validating peers: external probes, unreachable members, and the validation summary
that goes into this node's signed status.

    jobs = PeerChecks(config, identity, trust, enforcer, core, pipeline, metrics, log, tasks, wake)
    scheduler.add(Every("peer-probe", jobs.first_probe_s(), jobs.probe_round))      # jittered interval
    scheduler.add(Every("reachability", REACHABILITY_ROUND_S, jobs.reachability_round))

A probe round plans from what the node trusts and enforces (the signed policy and the valid member
certificates of the enforcer's latest wish, the members' advertised mesh ports from the core's view),
runs the connections off the scheduler in one task (a round never overlaps the previous one), raises and
resolves the findings, and feeds the summary (``ValidationReported``) to the core, which signs it into the
status when it changed. Findings still open from the previous run (restored by the alert pipeline) are
held and re-probed, so a hole that closed while the daemon was down is resolved.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from protocol.gossip.events import ValidationReported
from protocol.gossip.wire import SEVERITIES
from protocol.trust.metadata import Certificate

from ..alerting import AlertPipeline
from ..checks.local import deliver
from ..checks.peer_probe import ProbeResult, probe_target
from ..checks.peer_validation import CHECKS as PROBE_CHECKS
from ..checks.peer_validation import PeerValidation
from ..checks.probe_plan import ProbeBudget, plan_round
from ..checks.reachability import CHECKS as REACH_CHECKS
from ..checks.reachability import Reachability
from ..config import LoadedConfig
from ..enforcer import Enforcer
from ..identity import Identity
from ..metrics import Metrics
from .core_driver import CoreDriver
from .tasks import TaskSpawner

REACHABILITY_ROUND_S = 5.0  # also how often the open-alert counts are handed to the core
JITTER = 0.25  # each probe interval is drawn from interval * [1 - JITTER, 1 + JITTER]


class PeerChecks:
    def __init__(self, *, config: LoadedConfig, identity: Identity, enforcer: Enforcer, core: CoreDriver,
                 pipeline: AlertPipeline, metrics: Metrics, log: Any, tasks: TaskSpawner, skew_s: float,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.identity = identity
        self.enforcer = enforcer
        self.core = core
        self.pipeline = pipeline
        self.metrics = metrics
        self.log = log
        self.tasks = tasks
        self.skew_s = skew_s
        self.rng = rng or random.Random()
        self.validation = PeerValidation()
        self.reach: Reachability | None = None
        self._running = False
        self.rounds = 0
        self.reconfigure(config)
        for alert in pipeline.open_alerts():
            if alert.check in PROBE_CHECKS:
                self.validation.restore(alert.check, alert.subject, alert.summary)
            elif alert.check in REACH_CHECKS and self.reach is not None:
                self.reach.restore(alert.check, alert.subject, alert.summary)

    def reconfigure(self, config: LoadedConfig) -> None:
        self.config = config
        v = config.cfg.validate
        self.budget = ProbeBudget(targets=v.peer_probe_targets, refused=v.peer_probe_refused,
                                  reachable=v.peer_probe_reachable, extra_ports=tuple(v.peer_probe_ports))
        if not v.unreachable_after_s:
            self.reach = None
        elif self.reach is None or self.reach.after_s != v.unreachable_after_s:
            self.reach = Reachability(v.unreachable_after_s)

    def next_interval_s(self) -> float:
        return self.config.cfg.validate.peer_probe_interval_s * self.rng.uniform(1 - JITTER, 1 + JITTER)

    # -- external probes -------------------------------------------------------------------------------
    def probe_round(self) -> float:
        """Start one round (when probes are on, a policy is trusted and the last round ended); returns the
        next, jittered interval."""
        if self.config.cfg.validate.peer_probes and not self._running and self.core.node is not None:
            wanted = self.enforcer.wanted
            if wanted is not None:
                self._running = True
                self.tasks.spawn(self._probe(wanted[0], wanted[1]))
        return self.next_interval_s()

    async def _probe(self, policy: Any, members: list[Certificate]) -> None:
        try:
            await self._probe_round(policy, members)
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a failed round must not end the TaskGroup
            self.metrics.internal_errors.labels("checks.peer_probe").inc()
            self.log.warning("validate.peer_probe_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            self._running = False

    async def _probe_round(self, policy: Any, members: list[Certificate]) -> None:
        wall = time.time()
        self._forget(members, wall)
        advertised = self._advertised()
        # Off the event loop: it renders the targets' rulesets (a large policy or directory takes a while).
        plan = await asyncio.to_thread(
            plan_round, policy, self.identity.cert, members, advertised, self.rng, self.budget,
            held=self.validation.held(), source_address=self.config.cfg.mesh.source_address, now=wall,
            skew_s=self.skew_s)
        timeout_s = self.config.cfg.validate.peer_probe_timeout_s
        for target in plan:
            result = await probe_target(target, timeout_s=timeout_s, at=time.time())
            self._record(result)
        self.rounds += 1
        self._report()

    def _advertised(self) -> dict[str, str]:
        node = self.core.node
        if node is None:
            return {}
        return {node_id: address for node_id, _region, _liveness, address in node.member_summary() if address}

    def _forget(self, members: list[Certificate], wall: float) -> None:
        for check, changes in self.validation.forget(c.node_id for c in members).items():
            deliver(self.pipeline, check, changes, wall)

    def _record(self, result: ProbeResult) -> None:
        changes = self.validation.record(result)
        for verdict, n in self.validation.last_verdicts.items():
            self.metrics.peer_probes.labels(verdict).inc(n)
        self.log.info("validate.peer_probed", target=result.target, host=result.host, source=result.source,
                      ports={f"{p.expect}:{p.port}": p.outcome for p in result.ports},
                      errors=[p.detail for p in result.ports if p.detail][:3] or None)
        wall = time.time()
        for check, change in changes.items():
            deliver(self.pipeline, check, change, wall)

    # -- unreachable members, and the summary for the signed status ----------------------------------------
    def reachability_round(self) -> None:
        node = self.core.node
        if node is None:
            return
        if self.reach is not None:
            members = [(node_id, region, liveness) for node_id, region, liveness, _addr in node.member_summary()]
            wall = time.time()
            for check, changes in self.reach.round(members, me=self.identity.node_id, now=time.monotonic()).items():
                deliver(self.pipeline, check, changes, wall)
        self._report()

    def alert_counts(self) -> tuple[int, int, int, int]:
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in self.pipeline.open_alerts():
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
        c, e, w, i = (counts[s] for s in SEVERITIES)
        return (c, e, w, i)

    def _report(self) -> None:
        self.core.feed_if_running(ValidationReported(self.validation.reports(), self.alert_counts()))
