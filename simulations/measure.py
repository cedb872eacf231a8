"""What a run measures while it runs: traffic received per node and per wire kind, the converged
fraction per region over time, convergence times per version, false failure detections, alerts, and
the Byzantine convergence bound (an invariant).  ``simulations.report`` turns it into the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.gossip import Alert, LivenessChanged

from .hosts import Host, Version
from .wire import DISSEMINATION_KINDS, KIND_NAMES, NKINDS, frame_kind

if TYPE_CHECKING:
    from .context import MeasureSim


class Measurement:
    def __init__(self, sim: MeasureSim) -> None:
        self.sim = sim
        self.wire_bytes = sim.net.wire_bytes
        n = sim.n
        self.recv_bytes = [0] * (n + 1)
        self.recv_msgs = [0] * (n + 1)
        self.recv_diss = [0] * (n + 1)
        self.kind_bytes = [0] * NKINDS
        self.kind_msgs = [0] * NKINDS
        self.alerts: dict[str, int] = {}
        self.false_detections = 0
        self.false_suspicions = 0
        self.deaths = 0
        self.series_t: list[int] = []
        self.series: dict[str, list[float]] = {r: [] for r in sim.regions}
        self.idle_snap: list[int] | None = None
        self.idle_snap_t = 0
        self.idle_kinds: list[int] | None = None
        self.idle_by_kind: dict[str, float] = {}
        self._honest_by_region: list[list[Host]] | None = None

    # -- traffic -------------------------------------------------------------------------------------
    def frame_received(self, i: int, data: bytes) -> None:
        n = self.wire_bytes(len(data))
        self.recv_bytes[i] += n
        self.recv_msgs[i] += 1
        k = frame_kind(data)
        self.kind_bytes[k] += n
        self.kind_msgs[k] += 1
        if k in DISSEMINATION_KINDS:
            self.recv_diss[i] += n

    def datagram_bytes(self, i: int, nbytes: int, kind: int) -> None:
        """One datagram (a message's frame or fragment, a copy, an ack) arrived at node i."""
        self.recv_bytes[i] += nbytes
        self.kind_bytes[kind] += nbytes
        if kind in DISSEMINATION_KINDS:
            self.recv_diss[i] += nbytes

    def datagram_message(self, i: int, data: bytes) -> None:
        """A message carried as datagrams was delivered (its bytes came with ``datagram_bytes``)."""
        self.recv_msgs[i] += 1
        self.kind_msgs[frame_kind(data)] += 1

    def snapshot(self) -> list[int]:
        """Bytes, messages and dissemination bytes the nodes received so far."""
        n = self.sim.n
        return [sum(self.recv_bytes[:n]), sum(self.recv_msgs[:n]), sum(self.recv_diss[:n])]

    def snap_idle(self, _i: int, _arg: object) -> None:
        self.idle_snap = self.snapshot()
        self.idle_snap_t = self.sim.kernel.now
        self.idle_kinds = list(self.kind_bytes)

    def published(self, v: Version) -> None:
        v.snap_publish = self.snapshot()
        v.kinds_publish = list(self.kind_bytes)
        if v is self.sim.versions[0] and self.idle_kinds is not None:
            dt = max(1, self.sim.kernel.now - self.idle_snap_t) / 1000
            n = self.sim.n
            self.idle_by_kind = {KIND_NAMES[k]: round((self.kind_bytes[k] - self.idle_kinds[k]) / n / dt, 1)
                                 for k in KIND_NAMES if self.kind_bytes[k] != self.idle_kinds[k]}

    # -- convergence ---------------------------------------------------------------------------------
    def sample(self, _i: int, _arg: object) -> None:
        """The converged fraction per region (live honest nodes on the newest published version)."""
        sim = self.sim
        sim.drill.sample()
        now = sim.kernel.now
        v = self.current_version()
        self.series_t.append(now)
        if self._honest_by_region is None:  # hostility is fixed before the run
            self._honest_by_region = [[h for h in sim.hosts[: sim.n] if h.region == r and not h.hostile]
                                      for r in range(len(sim.regions))]
        up = sim.net.up
        for r, name in enumerate(sim.regions):
            live = [h for h in self._honest_by_region[r] if up[h.idx]]
            if v is None or not live:
                self.series[name].append(0.0 if live else float("nan"))
            else:
                self.series[name].append(sum(1 for h in live if h.applied >= v.serial) / len(live))
        nxt = now + sim.sc.measure.sample_ms
        if nxt <= sim.sc.duration_ms:
            sim.kernel.schedule(nxt, self.sample)

    def current_version(self) -> Version | None:
        cur = None
        for v in self.sim.versions:
            if v.published_at is not None:
                cur = v
        return cur

    def converged(self, h: Host) -> None:
        """Host ``h`` applied a serial: note the versions it reached (after the enforcer's apply time)."""
        if h.hostile:
            return
        sim = self.sim
        now = sim.kernel.now
        for v in sim.versions:
            if v.published_at is not None and h.applied >= v.serial and h.idx not in v.applied:
                v.applied[h.idx] = now + sim.sc.nodes.apply_ms
                if v.done_ms is None and len(v.applied) >= sim.live_honest:
                    up = sim.net.up
                    if all(x.idx in v.applied for x in sim.hosts[: sim.n] if up[x.idx] and not x.hostile):
                        v.done_ms = max(v.applied.values())
                        v.snap_done = self.snapshot()
                        v.kinds_done = list(self.kind_bytes)

    def check_bound(self, _i: int, v: Version) -> None:
        """The Byzantine guarantee: every honest node up since the publish applied it in the bound."""
        sim = self.sim
        pub = v.published_at
        assert pub is not None
        up = sim.net.up
        late = [h.node_id for h in sim.hosts[: sim.n]
                if up[h.idx] and not h.hostile and h.started_ms <= pub and h.idx not in v.applied]
        if late:
            sim.inv.violation(sim.seed, sim.kernel.now, f"{len(late)} honest node(s) had not applied serial "
                                                        f"{v.serial} {sim.sc.checks.convergence_bound_ms} ms after "
                                                        f"its publish (Byzantine bound), e.g. {late[:3]}")

    # -- failure detection and alerts ----------------------------------------------------------------
    def alert(self, eff: Alert) -> None:
        self.alerts[eff.event] = self.alerts.get(eff.event, 0) + 1

    def detection(self, i: int, eff: LivenessChanged) -> None:
        """Node ``i`` suspected or declared ``eff.node_id`` dead: false unless a fault explains it."""
        sim = self.sim
        j = sim.by_id.get(eff.node_id)
        if j is None:
            return
        dead = eff.liveness == "dead"
        if dead:
            self.deaths += 1
        if eff.source != sim.hosts[i].node_id:
            return  # learned from gossip: counted where it originated
        now = sim.kernel.now
        net = sim.net
        if not net.up[j] or not net.reachable(i, j, now):
            return
        lookback = sim.sc.checks.false_detection_lookback_ms
        disturb_end = sim.faults.disturb_end
        last = max(disturb_end[j], disturb_end[i], sim.hosts[j].started_ms, sim.hosts[i].started_ms)
        for c in net.cuts:
            if c.side[i] != c.side[j] and c.start <= now:
                last = max(last, min(c.end, now))
        if now - last >= lookback or last == 0 and now >= lookback:
            if dead:
                self.false_detections += 1
            else:
                self.false_suspicions += 1
