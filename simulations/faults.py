"""Faults from the scenario, put on the simulation's timeline: partitions and loss windows (in the
network model), crashes and region outages (processes stop; restarts boot from what the host
persisted), authority outages, and per-node clock skew.

Random picks (which nodes a partition or a crash takes) come from the ``faults`` generator; skews come
from the ``topology`` generator, drawn node by node before the join times.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from protocol.gossip import LeaveRequested, PeerDisconnected

from .drill.schedule import FLUSH_REPAIR_MS
from .network import NEVER, Cut

LEAVE_GRACE_MS = 1000  # a leaving node stops this long after it signed its left record

if TYPE_CHECKING:
    from .context import FaultsSim


def how_many(count: int, fraction: float, n: int) -> int:
    """``count`` nodes, else ``fraction`` of ``n`` (at least one when the fraction is not 0: a scenario
    scaled down keeps its churn)."""
    return count or (max(1, int(round(fraction * n))) if fraction > 0 else 0)


def draw_skews(sim: FaultsSim, topology: random.Random) -> None:
    """Each node's wall clock is off by up to ``clock_skew_s`` either way."""
    skew = sim.sc.clock_skew_s
    if skew:
        for i in range(sim.n):
            sim.kernel.skew_s[i] = topology.uniform(-skew, skew)


class Faults:
    def __init__(self, sim: FaultsSim, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.windows: list[tuple[int, int, str]] = []  # (start, end, label) for the report and the plot
        # Hosts that restart during the run: only these keep their persisted member file (n entries of
        # a few hundred bytes each, n^2 overall); the others only count its entries.
        self.restartable: set[int] = set()
        self.disturb_end: list[int] = [0] * (sim.n + 1)  # last restart per node
        self._crashed_serial: dict[int, int] = {}

    def schedule(self) -> None:
        sim = self.sim
        sc, n, net, kernel = sim.sc, sim.n, sim.net, sim.kernel
        for f in sc.faults:
            end = f.until_ms if f.until_ms is not None else NEVER
            if f.kind == "flush_ruleset":
                end = f.at_ms + FLUSH_REPAIR_MS
            self.windows.append((f.at_ms, min(end, sc.duration_ms), f.name or f.kind))
            if f.kind == "partition":
                side = bytearray(n + 1)
                if f.regions:
                    for h in sim.hosts:
                        side[h.idx] = 1 if sim.regions[h.region] in f.regions else 0
                else:
                    k = f.count or int(round(f.fraction * n))
                    for i in self.rng.sample(range(n), k):
                        side[i] = 1
                net.cuts.append(Cut(f.at_ms, end, side))
            elif f.kind == "loss":
                net.loss_windows.append((f.at_ms, end, f.loss))
            elif f.kind in ("region_outage", "crash"):
                if f.kind == "region_outage":
                    victims = [h.idx for h in sim.hosts[:n] if sim.regions[h.region] in f.regions]
                else:
                    victims = sorted(self.rng.sample(range(n), how_many(f.count, f.fraction, n)))
                blackhole = f.kind == "region_outage"
                for i in victims:
                    kernel.schedule(f.at_ms, self._crash, i, blackhole)
                    if end != NEVER:
                        kernel.schedule(end, self._restart, i)
                        if end <= sc.duration_ms:
                            self.restartable.add(i)
            elif f.kind == "leave":
                for i in sorted(self.rng.sample(range(n), how_many(f.count, f.fraction, n))):
                    kernel.schedule(f.at_ms, self._leave, i)
            elif f.kind == "authority_outage":
                kernel.schedule(f.at_ms, self._authority_down, n)
                if end != NEVER:
                    kernel.schedule(end, self._authority_up, n)

    def _crash(self, i: int, blackhole: bool) -> None:
        """The process of node ``i`` ends; a blackholed host also stops answering (its peers time out)."""
        sim = self.sim
        net, kernel = sim.net, sim.kernel
        h = sim.hosts[i]
        if not net.up[i]:
            return
        if not h.hostile:
            sim.live_honest -= 1
        kernel.stop(i)
        net.host_up[i] = not blackhole
        now = kernel.now
        for j in net.drop_node(i):
            delay = sim.sc.tcp.user_timeout_ms if blackhole else int(net.one_way(i, j)) + 1
            kernel.push(now + delay, j, PeerDisconnected(h.node_id), net.epoch[j])
        self._crashed_serial[i] = h.applied

    def _leave(self, i: int, _arg: Any) -> None:
        """Node ``i`` leaves the cluster gracefully (signs a left record and spreads it), and its
        process ends a second later."""
        sim = self.sim
        if not sim.net.up[i]:
            return
        sim.kernel.feed(i, LeaveRequested())
        sim.kernel.schedule(sim.kernel.now + LEAVE_GRACE_MS, self._crash, i, False)

    def _restart(self, i: int, _arg: Any) -> None:
        sim = self.sim
        h = sim.hosts[i]
        if sim.net.up[i] or sim.kernel.procs[i] is not None:
            return
        sim.net.epoch[i] += 1
        self.disturb_end[i] = sim.kernel.now
        before = self._crashed_serial.get(i, 0)
        sim.boot(i)
        if h.applied < before:
            sim.inv.violation(sim.seed, sim.kernel.now, f"{h.node_id} restarted enforcing serial {h.applied}, "
                                                        f"had {before}")

    def _authority_down(self, i: int, _arg: Any) -> None:
        self.sim.net.up[i] = False
        self.sim.net.host_up[i] = False

    def _authority_up(self, i: int, _arg: Any) -> None:
        sim = self.sim
        sim.net.up[i] = True
        sim.net.host_up[i] = True
        sim.net.epoch[i] += 1
        for v in sim.versions:
            if v.published_at is None and v.publish_ms <= sim.kernel.now:
                sim.publish(0, v)
