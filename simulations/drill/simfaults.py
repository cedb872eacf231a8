"""The chaos drill in the simulator: the node faults of ``schedule.plan`` on the simulation's timeline, a
model of each host's kernel ruleset, and the drill invariants (``checks.DrillChecks``) fed from the
simulation exactly as the real drill feeds them from ``/v1/status``, the kernel and the alert webhook.

What the simulator models of the shell (``meshnode``), where the protocol core has no say:

* the kernel ruleset: loaded when the node applies a policy (and at boot: the persisted policy), kept
  across a crash (the table stays in the kernel), gone on ``flush_ruleset`` until the drift repair
  (``DRIFT_DETECT_MS`` after the flush the ``enforce.drift`` alert triggers; ``DRIFT_REPAIR_MS`` after it
  the ruleset is back and the alert resolves; a node that is down repairs by its boot apply, no alert);
* a full disk: every persist of the node fails (its ``Disk`` keeps the last good state, a restart boots
  from it), ``state.write_failed`` triggers on the first failure and resolves when the disk has room and
  the pending writes land;
* clock skew: the node restarts with its wall clock skewed (``Kernel.skew_s``), and again without at
  the end (the real drill restarts it under libfaketime);
* descriptor pressure: the node can hold at most ``nofile - FD_BASELINE`` connections; a dial from or to
  it beyond that is refused (the real daemon's accept or connect fails with EMFILE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.gossip.events import PolicyResult

from .checks import SAMPLE_MS, DrillChecks, Sample
from .schedule import Episode, last_heal_ms, plan

if TYPE_CHECKING:
    from ..context import DrillSim
    from ..hosts import Version

DRIFT_DETECT_MS = 100  # the daemon's nft monitor settle time (meshnode.daemon.ruleset_watch.SETTLE_S)
DRIFT_REPAIR_MS = 150  # detection + read back + one nft transaction: 142 ms measured by chaos --real here
FD_BASELINE = 40  # descriptors a meshnode process holds besides its peer connections


class SimDrill:
    def __init__(self, sim: DrillSim) -> None:
        self.sim = sim
        n = sim.n
        self.episodes: list[Episode] = plan(sim.sc, n)
        self.checks = DrillChecks(sim.ids[:n], self.episodes, sim.seed)
        self.kernel: list[int | None] = [None] * n  # the serial whose ruleset the kernel holds
        self.timeline: list[dict[str, Any]] = []
        self.next_sample = 0
        self.kills = 0
        self.skew_restarts = 0

    # -- scheduling ---------------------------------------------------------------------------------
    def schedule(self) -> None:
        kernel, dur = self.sim.kernel, self.sim.sc.duration_ms
        restartable = self.sim.faults.restartable  # these keep their persisted member file (see Faults)
        for e in self.episodes:
            if e.kind in ("kill9", "clock_skew"):
                restartable.update(e.nodes if e.nodes else range(self.sim.n))  # after_publish: any node
            self.timeline.append({"planned_ms": e.start_ms, "at_ms": e.start_ms, "action": f"{e.kind} {e.name}"})
            if e.end_ms is not None and e.end_ms <= dur and e.kind != "flush_ruleset":
                verb = "restart" if e.kind in ("kill9", "crash", "region_outage") else "heal"
                self.timeline.append({"planned_ms": e.end_ms, "at_ms": e.end_ms, "action": f"{verb} {e.name}"})
            if e.kind == "kill9" and e.nodes:
                kernel.schedule(e.start_ms, self._kill, e.nodes[0], e.end_ms)
            elif e.kind == "disk_full":
                for i in e.nodes:
                    kernel.schedule(e.start_ms, self._disk, i, True)
                    kernel.schedule(e.end_ms or dur, self._disk, i, False)
            elif e.kind == "clock_skew":
                for i in e.nodes:
                    kernel.schedule(e.start_ms, self._skew, i, float(e.detail["skew_s"]))
                    if e.end_ms is not None:
                        kernel.schedule(e.end_ms, self._skew, i, 0.0)
            elif e.kind == "flush_ruleset":
                for i in e.nodes:
                    kernel.schedule(e.start_ms, self._flush, i)
            elif e.kind == "fd_pressure":
                cap = max(0, int(e.detail["nofile"]) - FD_BASELINE)
                for i in e.nodes:
                    kernel.schedule(e.start_ms, self._fd, i, cap)
                    if e.end_ms is not None:
                        kernel.schedule(e.end_ms, self._fd, i, None)
        self.timeline.sort(key=lambda x: x["planned_ms"])

    def note(self, action: str) -> None:
        now = self.sim.kernel.now
        self.timeline.append({"planned_ms": now, "at_ms": now, "action": action})

    # -- the shell's part ---------------------------------------------------------------------------
    def applied(self, i: int, serial: int) -> None:
        """Node ``i`` loaded the ruleset of ``serial`` (an apply, or the boot apply)."""
        if i < len(self.kernel):
            self.kernel[i] = serial

    def submitted(self, target: int, v: Version, effects: list[Any]) -> None:
        """The operator's publish of ``v`` to ``target`` was answered with ``effects``."""
        if not any(type(e) is PolicyResult and e.accepted for e in effects):
            return
        now = self.sim.kernel.now
        self.checks.acknowledged(now, target, v.serial)
        for e in self.episodes:
            if e.kind == "kill9" and e.detail.get("after_publish") and e.start_ms <= now < (e.end_ms or 1 << 62):
                self.note(f"kill9 {self.sim.ids[target]} right after it acknowledged serial {v.serial}")
                self._kill(target, now + int(e.detail["restart_after_ms"]))
                break

    def _kill(self, i: int, restart_at: int | None) -> None:
        sim = self.sim
        if not sim.net.up[i]:
            self.note(f"kill9 {sim.ids[i]} skipped: already down")
            return
        self.kills += 1
        sim.faults._crash(i, False)
        if restart_at is not None:
            sim.kernel.schedule(restart_at, sim.faults._restart, i)

    def _disk(self, i: int, full: bool) -> None:
        disk = self.sim.hosts[i].disk
        disk.full = full
        if not full:
            had_failures = disk.flush_pending()
            if had_failures:
                self.checks.alert(self.sim.kernel.now, i, "state.write_failed", "resolve")

    def write_failed(self, i: int) -> None:
        """A persist of node ``i`` failed (its disk is full): the first failure of an episode alerts."""
        self.checks.alert(self.sim.kernel.now, i, "state.write_failed", "trigger")

    def _skew(self, i: int, skew: float) -> None:
        sim = self.sim
        sim.kernel.skew_s[i] = skew
        if sim.net.up[i]:
            self.skew_restarts += 1
            sim.faults._crash(i, False)
            sim.faults._restart(i, None)

    def _flush(self, i: int, _arg: Any = None) -> None:
        sim = self.sim
        now = sim.kernel.now
        if self.kernel[i] is None:
            return
        self.kernel[i] = None
        if not sim.net.up[i]:
            self.checks.no_alert_expected(now, i)
            return  # the boot apply restores it
        self.checks.alert(now + DRIFT_DETECT_MS, i, "enforce.drift", "trigger")
        sim.kernel.schedule(now + DRIFT_REPAIR_MS, self._repair, i, (now, sim.net.epoch[i]))

    def _repair(self, i: int, arg: tuple[int, int]) -> None:
        sim = self.sim
        since, epoch = arg
        if sim.net.up[i] and sim.net.epoch[i] == epoch and self.kernel[i] is None:
            self.kernel[i] = sim.hosts[i].applied
            self.checks.kernel_gap(since, sim.kernel.now, i)
            self.checks.alert(sim.kernel.now, i, "enforce.drift", "resolve")

    def _fd(self, i: int, cap: int | None) -> None:
        if cap is None:
            self.sim.net.conn_cap.pop(i, None)
        else:
            self.sim.net.conn_cap[i] = cap

    # -- observation --------------------------------------------------------------------------------
    def sample(self) -> None:
        """Every ``SAMPLE_MS`` (from the measurement's sampling): each honest node, as the real drill sees it."""
        sim = self.sim
        now = sim.kernel.now
        if now < self.next_sample:
            return
        self.next_sample = now + SAMPLE_MS
        up, procs = sim.net.up, sim.kernel.procs
        checks = self.checks
        for h in sim.hosts[: sim.n]:
            i = h.idx
            if h.hostile:
                continue
            if not up[i]:
                checks.sample(now, i, Sample(up=False))
                continue
            trust = getattr(procs[i], "trust", None)
            rv = trust.root_version if trust is not None else 1
            k = self.kernel[i]
            checks.sample(now, i, Sample(True, (rv, h.applied), str(h.applied) if h.applied > 0 else None,
                                         None if k is None else str(k)))

    def finish(self, live: list[Any]) -> dict[str, Any]:
        sim = self.sim
        sc = sim.sc
        now = sim.kernel.now
        final: dict[int, tuple[int, int] | None] = {}
        for h in live:
            trust = getattr(sim.kernel.procs[h.idx], "trust", None)
            final[h.idx] = (trust.root_version if trust is not None else 1, h.applied)
        require = sc.checks.require_convergence and sc.protocol == "gossip"
        return self.checks.finish(now, [h.idx for h in live], final, sim.versions[-1].serial,
                                  last_heal_ms(self.episodes, sc.duration_ms), require)

    def report_fields(self, invariants: dict[str, Any]) -> dict[str, Any]:
        ids = self.sim.ids
        return {
            "mode": "sim",
            "invariants": invariants,
            "fault_schedule": [e.to_json(ids) for e in self.episodes],
            "fault_timeline": sorted(self.timeline, key=lambda x: x["at_ms"]),
            "drill": {
                "samples": self.checks.samples,
                "sample_ms": SAMPLE_MS,
                "kills": self.kills,
                "restarts": self.skew_restarts,
                "kernel_gaps": [{"from_ms": a, "to_ms": b, "node": n} for a, b, n in self.checks.gaps],
                "alert_events": len(self.checks.alerts),
                "not_emulated": [],
                "nodes_capped_from": None,
            },
        }
