"""Deterministic discrete-event simulation of a scenario, driving the real ``protocol.gossip.node.Node`` objects.

The parts: ``kernel`` (the event loop), ``hosts`` (set-up from the scenario), ``network`` (the network
model: latency, loss, TCP connections, partitions), ``faults``, ``effects`` (what a node's effects
do), ``world`` (the ``World`` those effects reach: sends through the network model, applies through
the enforcer model), ``measure`` and ``report``, ``invariants``.  ``Simulation`` wires them together,
boots the nodes and publishes the versions; the parts see it through the narrow protocols of
``simulations.context`` (none of them imports this module).

One master seed is split per subsystem (``random.Random(f"{seed}:{name}")``: topology, network,
faults, hostile, publisher, and one per node and restart); the network decides each message's fate
from its own generator.  Invariants are checked after every step; a violation is recorded with the
seed so the run replays exactly.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from typing import Any

from protocol.gossip import (
    Node,
    Now,
    PolicySubmitted,
)
from protocol.gossip.member_base import ConvergedDirectory

from .baselines import AuthorityServer
from .drill.simfaults import SimDrill
from .effects import execute
from .faults import Faults, draw_skews, how_many
from .hosts import ProcessFactory, Version, build_hosts, build_versions, pick_hostile, seed_addresses
from .identities import make_authority
from .invariants import Invariants
from .kernel import Kernel
from .measure import Measurement
from .network import Network
from .report import build_report
from .scenario import Scenario
from .world import SimWorld

EMPTY_DIRECTORY = ConvergedDirectory.empty()


class Simulation:
    def __init__(self, sc: Scenario, progress: bool = False) -> None:
        self.sc = sc
        self.seed = sc.seed
        self.progress = progress
        self.rngs: dict[str, random.Random] = {}
        self.process_ms = int(round(sc.nodes.process_ms))
        self.cfg = sc.gossip_config()
        self.regions = list(sc.nodes.regions)
        self.n = n = sc.nodes.count
        self.auth = make_authority(cluster="sim", label=f"sim-authority-{sc.seed}")
        self.anchor = self.auth.root_bytes
        self.inv = Invariants(self.anchor)
        self.kernel = Kernel(n + 1, self._execute)
        self.live_honest = 0  # hosts i < n up and not hostile
        self.wall_s = 0.0
        topology = self.rng("topology")
        auth_region = self.regions.index(sc.baselines.authority_region) if sc.baselines.authority_region else 0
        self.hosts = build_hosts(sc, self.auth, auth_region)
        draw_skews(self, topology)
        self.by_id = {h.node_id: h.idx for h in self.hosts}
        self.by_addr = {h.address: h.idx for h in self.hosts}
        self.ids = [h.node_id for h in self.hosts]
        self.cert_of = [h.ident.cert_bytes if h.ident else b"" for h in self.hosts]
        self.seeds = seed_addresses(sc, self.hosts)
        self.net = Network(sc.network, sc.tcp, self.regions, [h.region for h in self.hosts], self.rng("network"))
        self.net.up, self.net.epoch = self.kernel.up, self.kernel.epoch  # one truth, shared
        self.net.host_up = [True] * (n + 1)
        self.measure = Measurement(self)
        self.kernel.on_frame = self.measure.frame_received
        self.v1, self.versions = build_versions(sc, self.auth, self.inv.legit)
        self.policy_bytes = len(self.versions[-1].envelope)
        pick_hostile(sc, self.hosts, self.seeds, self.rng("hostile"))
        self.hostile_idx = frozenset(h.idx for h in self.hosts if h.hostile)
        self.converged_base: ConvergedDirectory | None = None
        self._converging = False  # nodes boot for a converged start (see _schedule_converged)
        self.processes = ProcessFactory(sc, self.cfg, self.anchor, self.hosts, self.seeds, self.v1)
        self._schedule()

    def rng(self, name: str) -> random.Random:
        """The generator of one subsystem (the same one on every call)."""
        r = self.rngs.get(name)
        if r is None:
            r = self.rngs[name] = random.Random(f"{self.seed}:{name}")
        return r

    def _schedule(self) -> None:
        sc, kernel, n = self.sc, self.kernel, self.n
        topology = self.rng("topology")  # after the skews (draw_skews)
        if sc.nodes.converged and sc.protocol == "gossip":
            self._schedule_converged(topology)
        else:
            # joins spread over join_spread_ms; seeds first
            for h in self.hosts[:n]:
                at = 0 if h.address in self.seeds else topology.randrange(max(1, sc.nodes.join_spread_ms))
                kernel.schedule(at, self._boot_action, h.idx)
        b = sc.baselines
        self.authority = AuthorityServer(b.request_bytes, b.not_modified_bytes, b.response_overhead_bytes)
        kernel.procs[n] = self.authority
        kernel.up[n] = True
        for v in self.versions:
            kernel.schedule(v.publish_ms, self.publish, 0, v)
        self.faults = Faults(self, self.rng("faults"))
        self.faults.schedule()
        self.drill = SimDrill(self)  # the chaos drill's node faults, kernel model and invariants
        self.drill.schedule()
        self.world = SimWorld(self, self.measure, self.drill, self.by_addr, self.cert_of, self.hostile_idx, self.process_ms)
        for h in self.hosts:
            h.disk.keep_members = h.idx in self.faults.restartable
        first = self.versions[0].publish_ms
        self.idle_start = max(0, first - sc.measure.idle_window_ms)
        kernel.schedule(self.idle_start, self.measure.snap_idle)
        self.sample_start = max(0, first - 5 * sc.measure.sample_ms)
        kernel.schedule(self.sample_start, self.measure.sample)

    def _schedule_converged(self, topology: random.Random) -> None:
        """Every node boots at 0 and adopts one shared converged directory, except ``nodes.joins``
        of them (never seeds), which join during ``nodes.join_window_ms``."""
        sc, kernel, n = self.sc, self.kernel, self.n
        pool = [h.idx for h in self.hosts[:n] if h.address not in self.seeds]
        joiners = set(topology.sample(pool, min(len(pool), how_many(0, sc.nodes.joins, n))))
        lo, hi = sc.nodes.join_window_ms
        for h in self.hosts[:n]:
            at = lo + topology.randrange(max(1, hi - lo)) if h.idx in joiners else 0
            kernel.schedule(at, self._boot_action, h.idx)
        self._converging = True
        kernel.schedule(0, self._converge)

    def _converge(self, _i: int, _arg: Any) -> None:
        """The nodes up now adopt one converged directory of their own signed records and statuses
        (verified once, like any record a peer relays; see protocol.gossip.member_base)."""
        self._converging = False
        procs = [p for p in self.kernel.procs[: self.n] if isinstance(p, Node)]
        if not procs:
            return
        base = converged_base(procs, self.kernel.wall(0, self.kernel.now))
        for p in procs:
            p.membership.adopt(base)  # (what the base holds is not re-announced: a fleet that has been running)
        self.converged_base = base

    # -- processes -----------------------------------------------------------------------------------
    def boot(self, i: int) -> None:
        """Node ``i`` starts from what its host persisted (at first: the enrolled anchor and serial 1)."""
        h = self.hosts[i]
        kernel = self.kernel
        if h.disk.policy is None:
            h.disk.policy = self.v1
        trust = self.processes.trust_from_disk(h.disk, kernel.wall(i, kernel.now))
        h.applied = trust.serial
        self.drill.applied(i, trust.serial)  # the boot apply of the persisted policy
        proc = self.processes.make(h, trust, kernel.epoch[i])
        if self._converging and isinstance(proc, Node):
            # booting side by side before the snapshot exists: overlays from the first record on
            # (plain columns would grow to every id interned so far: O(n^2) in all)
            proc.membership.adopt(EMPTY_DIRECTORY)
        h.started_ms = kernel.now
        if h.joined_ms is None:
            h.joined_ms = kernel.now
        if not kernel.up[i] and not h.hostile:
            self.live_honest += 1
        self.net.host_up[i] = True
        kernel.start(i, proc)

    def _boot_action(self, i: int, _arg: Any) -> None:
        self.boot(i)

    def _execute(self, i: int, effects: list[Any]) -> None:
        execute(i, self.hosts[i].disk, effects, self.world)

    # -- publishing ----------------------------------------------------------------------------------
    def publish(self, _i: int, v: Version) -> None:
        """The operator submits version ``v`` to one node (central-pull: only the authority has it)."""
        kernel, n = self.kernel, self.n
        if not self.net.up[n]:
            return  # the authority is down: publish when it is back (see Faults)
        v.published_at = kernel.now
        self.measure.published(v)
        self.authority.publish(v.envelope, v.hash)
        if self.sc.protocol == "central-pull":
            return
        prng = self.rng("publisher")
        region = self.sc.policy.publisher_region
        cands = [h.idx for h in self.hosts[:n] if self.net.up[h.idx] and not h.hostile
                 and (region is None or self.regions[h.region] == region)]
        if not cands:
            return
        target = prng.choice(cands)
        if self.sc.checks.convergence_bound_ms:
            kernel.schedule(kernel.now + self.sc.checks.convergence_bound_ms, self.measure.check_bound, 0, v)
        if v.twin is not None:
            # the same serial signed twice, published at the same moment through another node
            # (another region when there is one)
            others = [c for c in cands if self.hosts[c].region != self.hosts[target].region] or \
                [c for c in cands if c != target]
            if others:
                kernel.feed(prng.choice(others), PolicySubmitted(v.twin, "operator"))
        self.drill.submitted(target, v, kernel.feed(target, PolicySubmitted(v.envelope, "operator")))

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # Millions of long-lived small objects: the cyclic GC would rescan them all, again and again.
        gc.collect()
        gc.freeze()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            self._run_events()
            self.wall_s = time.perf_counter() - t0
            return build_report(self)
        finally:
            if gc_was:
                gc.enable()
            gc.unfreeze()

    def _run_events(self) -> None:
        end = self.sc.duration_ms
        bar = None
        if self.progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the [sim] extra is not installed: no progress bar
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=end // 1000, unit="vs", desc=f"{self.sc.name} ({self.sc.protocol})",
                           file=sys.stderr, leave=False)
        if bar is None:
            self.kernel.run_until(end)
            return
        shown = [0]

        def tick(at: int) -> None:
            if at // 1000 > shown[0]:
                bar.update(at // 1000 - shown[0])
                shown[0] = at // 1000

        self.kernel.run_until(end, tick)
        bar.close()

    def live_hosts(self) -> list[Any]:
        return [h for h in self.hosts[: self.n] if self.net.up[h.idx] and not h.hostile]

    def end_checks(self, live: list[Any]) -> tuple[list[str], dict[str, Any] | None]:
        """Invariants at the end of the run: the nodes not converged, and the equivocation summary."""
        sc, last = self.sc, self.versions[-1]
        now = self.kernel.now
        missing = [h.node_id for h in live if h.applied < last.serial]
        # Convergence after the faults end is an invariant of the gossip protocol; the baselines
        # promise no such thing, their shortfall is reported as converged_fraction.
        if sc.checks.require_convergence and sc.protocol == "gossip" and missing:
            self.inv.violation(self.seed, now, f"{len(missing)} live node(s) not converged to serial "
                                               f"{last.serial} at the end, e.g. {missing[:3]}")
        if last.twin_hash is None or sc.protocol != "gossip":
            return missing, None
        procs: list[Any] = self.kernel.procs
        keep = min(last.hash, last.twin_hash)
        other = [h.node_id for h in live if procs[h.idx].trust.policy_hash != keep]
        if other and sc.checks.require_convergence:
            self.inv.violation(self.seed, now, f"{len(other)} live node(s) not on the lower hash of the "
                                               f"equivocated serial {last.serial}, e.g. {other[:3]}")
        status_now = Now(now, self.kernel.wall(0, now))
        shown = sum(1 for h in live if procs[h.idx].status(status_now)["convergence"]["state"] == "equivocation")
        return missing, {"serial": last.serial, "kept": keep, "on_kept": len(live) - len(other),
                         "status_shows_equivocation": shown, "alerts": self.measure.alerts.get("policy.equivocation", 0)}

    @property
    def bodies_to_hostile(self) -> int:
        """Policy bodies honest nodes sent to hostile ones (flood: pulls)."""
        return self.world.bodies_to_hostile

    @property
    def datagram_counts(self) -> dict[str, int]:
        """transport = "mixed": what went as datagrams (simulations.world)."""
        return self.world.datagram_counts

    @property
    def restartable(self) -> set[int]:
        return self.faults.restartable

    @property
    def persisted_member_entries(self) -> int:
        """Entries of every member file any host persisted (kept or not)."""
        return sum(h.disk.member_entries_written for h in self.hosts)


def run_scenario(sc: Scenario, progress: bool = False) -> tuple[dict[str, Any], Simulation]:
    sim = Simulation(sc, progress=progress)
    report = sim.run()
    return report, sim


def replay_hint(report: dict[str, Any]) -> str:
    return f"seed={report['seed']} scenario={report['scenario']} protocol={report['protocol']} nodes={report['nodes']}"


def converged_base(nodes: list[Node], wall: float) -> ConvergedDirectory:
    """One converged directory of ``nodes``' own signed records and statuses, each record verified
    once (like any record a peer relays; see protocol.gossip.member_base)."""
    records = nodes[0].membership.records
    recs, statuses = [], []
    for node in nodes:
        t = node.members
        own = t.rec_at(t.me_index)
        assert own is not None
        recs.append(records.verify_record(own.record, wall))
        statuses.append(t.statuses[t.me_index])
    return ConvergedDirectory(nodes[0].members.ids, recs, statuses)
