"""Deterministic discrete-event simulator driving the real ``protocol.node.Node`` objects.

A heap of ``(at_ms << SEQ_BITS | seq, kind, node, a, b, c)`` (one int key: ordered by time, then
by push order); a virtual clock in integer milliseconds; one master seed
split per subsystem (``random.Random(f"{seed}:{name}")``: topology, network, faults, publisher, and
one per node); the network decides each message's fate from its own generator.  Invariants are checked
after every step; a violation is recorded with the seed so the run replays exactly.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import TrustError
from protocol.gossip_events import (
    Alert,
    Disconnect,
    Enforce,
    FrameReceived,
    LivenessChanged,
    MemberEntry,
    Now,
    PeerConnected,
    PeerDisconnected,
    PersistMembers,
    PersistPolicy,
    PersistRoot,
    PolicySubmitted,
    RulesetApplied,
    Send,
    SendFailed,
    TimerFired,
)
from protocol.membership import VerifyCache
from protocol.metadata import decode_policy, payload_hash
from protocol.node import Node
from protocol.policy import PolicyDocument, Rule, validate_document
from protocol.signing import decode_envelope
from protocol.trust import TrustedState

from .baselines import AUTHORITY_ID, AuthorityServer, CentralPullAgent, FloodNode
from .hostile import HostileNode
from .identities import T0, NodeIdentity, make_authority, make_node
from .invariants import Invariants
from .network import NEVER, Cut, Network
from .scenario import Scenario

TIMER, DELIVER, CONNECTED, DISCONNECTED, SEND_FAILED, ACTION = range(6)
SEQ_BITS = 40  # heap key = at_ms << SEQ_BITS | seq: one int compare per heap step, not a tuple compare
TIMER_FIRED = TimerFired()  # frozen, no fields: one instance serves every timer
DISSEMINATION_TAGS = frozenset((5, 6, 7, 8, 9, 102))
KIND_NAMES = {1: "ping", 2: "ack", 3: "ping_req", 4: "nack", 5: "announce", 6: "policy_pull", 7: "policy_push",
              8: "root_pull", 9: "root_push", 10: "sync", 11: "sync_entries", 12: "member_pull", 13: "members",
              100: "poll", 101: "not_modified", 102: "body"}
NKINDS = 103
SERF_MODEL_MS = 2390  # memberlist/Serf convergence model: fanout 3, 200 ms interval, 10% loss, 99.99% of 1000


def frame_kind(data: bytes) -> int:
    if len(data) > 1 and 0x90 <= data[0] <= 0x9F:
        k = data[1]
        return k if k < NKINDS else 0
    return 0


def make_document(rules: int) -> PolicyDocument:
    """A realistic policy of ``rules`` allow rules (size scales with the count)."""
    out = []
    for i in range(rules):
        out.append(Rule(name=f"svc-{i:04d}-ingress", sources=(f"node:n{i:05d}", f"role:app{i % 17}"),
                        to=(f"role:svc{i % 29}",), ports=(f"tcp/{10000 + i}", f"udp/{20000 + i}")))
    return validate_document(PolicyDocument(allow=tuple(out)))


@dataclass
class Version:
    serial: int
    envelope: bytes
    hash: str
    publish_ms: int
    published_at: int | None = None
    applied: dict[int, int] = field(default_factory=dict)  # node index -> first ms with serial >= this
    snap_publish: list[int] | None = None
    snap_done: list[int] | None = None
    done_ms: int | None = None
    twin: bytes | None = None  # policy.equivocate: another policy signed with the same serial
    twin_hash: str | None = None


@dataclass
class Host:
    idx: int
    ident: NodeIdentity | None
    node_id: str
    address: str
    region: int
    proc: Any = None
    applied: int = 0
    persisted_policy: bytes | None = None
    persisted_roots: list[bytes] = field(default_factory=list)
    persisted_members: tuple[MemberEntry, ...] | None = None  # kept only for hosts that can restart (see _faults)
    members_persisted: int = 0  # entries in the last persisted member file (kept or not)
    directory: Any = None  # the members of the node's last Enforce (its own dict): never mutated
    hostile: bool = False
    started_ms: int = 0
    skew_s: float = 0.0


class Simulation:
    def __init__(self, sc: Scenario, progress: bool = False) -> None:
        self.sc = sc
        self.process_ms = int(round(sc.nodes.process_ms))
        self.seed = sc.seed
        self.progress = progress
        self.rngs: dict[str, random.Random] = {}
        self.cfg = sc.gossip_config()
        self.regions = list(sc.nodes.regions)
        self.n = sc.nodes.count
        self.auth = make_authority(cluster="sim", label=f"sim-authority-{sc.seed}")
        self.anchor = self.auth.root_bytes
        self.cache = VerifyCache()
        self.heap: list[tuple] = []
        self._next_seq = itertools.count(1).__next__
        self.now = 0
        self._now_obj = Now(-(1 << 62), 0.0)  # the last Now handed out, reused for the same ms and skew
        self._now_skew = 0.0
        self.events = 0
        self.inv = Invariants(self.anchor)
        self.alerts: dict[str, int] = {}
        self.false_detections = 0
        self.false_suspicions = 0
        self.deaths = 0
        self.recv_bytes = [0] * (self.n + 1)
        self.recv_msgs = [0] * (self.n + 1)
        self.recv_diss = [0] * (self.n + 1)
        self.kind_bytes = [0] * NKINDS
        self.kind_msgs = [0] * NKINDS
        self.series_t: list[int] = []
        self.series: dict[str, list[float]] = {r: [] for r in self.regions}
        self.fault_windows: list[tuple[int, int, str]] = []
        self.disturb_end: list[int] = [0] * (self.n + 1)
        # Hosts that restart during the run: only these keep their persisted member file (n entries of
        # a few hundred bytes each, n^2 overall); the others only count its entries.
        self.restartable: set[int] = set()
        self.persisted_member_entries = 0
        self._crashed_serial: dict[int, int] = {}
        self.live_honest = 0  # hosts i < n with net.up[i] and not hostile
        self._build()

    # -- setup ---------------------------------------------------------------------------------------
    def rng(self, name: str) -> random.Random:
        r = self.rngs.get(name)
        if r is None:
            r = self.rngs[name] = random.Random(f"{self.seed}:{name}")
        return r

    def _build(self) -> None:
        sc = self.sc
        topo = self.rng("topology")
        nreg = len(self.regions)
        region_of = [i % nreg for i in range(self.n)]
        auth_region = self.regions.index(sc.baselines.authority_region) if sc.baselines.authority_region else 0
        self.hosts: list[Host] = []
        for i in range(self.n):
            r = region_of[i]
            nid = f"n{i:05d}"
            ip = f"10.{r}.{(i // 250) % 250}.{i % 250 + 1}"
            ident = make_node(self.auth, nid, region=self.regions[r], addresses=(ip,), label="sim")
            h = Host(i, ident, nid, f"{ip}:7946", r)
            if sc.clock_skew_s:
                h.skew_s = topo.uniform(-sc.clock_skew_s, sc.clock_skew_s)
            self.hosts.append(h)
        self.hosts.append(Host(self.n, None, AUTHORITY_ID, "192.0.2.1:443", auth_region))
        self.by_id = {h.node_id: h.idx for h in self.hosts}
        self.ids = [h.node_id for h in self.hosts]
        self.cert_of = [h.ident.cert_bytes if h.ident else b"" for h in self.hosts]
        self.by_addr = {h.address: h.idx for h in self.hosts}
        self.seeds: list[str] = []
        for r in range(nreg):
            in_r = [h for h in self.hosts[: self.n] if h.region == r]
            self.seeds += [h.address for h in in_r[: sc.nodes.seeds_per_region]]
        self.net = Network(sc.network, sc.tcp, self.regions, [h.region for h in self.hosts], self.rng("network"))
        self.net.up = [False] * (self.n + 1)
        self.net.host_up = [True] * (self.n + 1)
        self.net.epoch = [0] * (self.n + 1)
        self.timer_at: list[int | None] = [None] * (self.n + 1)
        # versions: serial 1 is enrolled with every node at boot; each publish_at is one new serial
        doc = make_document(sc.policy.rules)
        self.versions: list[Version] = []
        env1 = self.auth.sign_policy(doc, 1, T0 - 3600, T0 + sc.policy.valid_s)
        self.v1 = env1
        self.inv.legit[payload_hash(decode_envelope(env1, "policy").payload)] = 1
        for k, at in enumerate(sorted(sc.policy.publish_at_ms)):
            serial = k + 2
            issued = T0 + at // 1000
            env = self.auth.sign_policy(doc, serial, issued, issued + sc.policy.valid_s)
            h = payload_hash(decode_envelope(env, "policy").payload)
            self.inv.legit[h] = serial
            self.versions.append(Version(serial, env, h, at))
            if sc.policy.equivocate:
                twin = self.auth.sign_policy(doc, serial, issued + 1, issued + sc.policy.valid_s)
                th = payload_hash(decode_envelope(twin, "policy").payload)
                self.inv.legit[th] = serial
                self.versions[-1].twin, self.versions[-1].twin_hash = twin, th
        self.policy_bytes = len(self.versions[-1].envelope)
        # hostile nodes (never seeds, never the publisher's region's first node)
        hc = sc.hostile.count or int(round(sc.hostile.fraction * self.n))
        pool = [h.idx for h in self.hosts[: self.n] if h.address not in self.seeds]
        for i in self.rng("hostile").sample(pool, min(hc, len(pool))):
            self.hosts[i].hostile = True
        self.hostile_idx = frozenset(h.idx for h in self.hosts if h.hostile)
        self.bodies_to_hostile = 0  # policy bodies honest nodes sent to hostile ones (flood: pulls)
        # joins spread over join_spread_ms; seeds first
        for h in self.hosts[: self.n]:
            at = 0 if h.address in self.seeds else topo.randrange(max(1, sc.nodes.join_spread_ms))
            self._push(at, ACTION, h.idx, self._boot, None)
        self._boot_authority()
        for v in self.versions:
            self._push(v.publish_ms, ACTION, 0, self._publish, v)
        self._faults()
        first = self.versions[0].publish_ms
        self.idle_start = max(0, first - sc.measure.idle_window_ms)
        self._push(self.idle_start, ACTION, 0, self._snap_idle, None)
        self.sample_start = max(0, first - 5 * sc.measure.sample_ms)
        self._push(self.sample_start, ACTION, 0, self._sample, None)

    def _boot_authority(self) -> None:
        a = self.hosts[self.n]
        b = self.sc.baselines
        a.proc = AuthorityServer(b.request_bytes, b.not_modified_bytes, b.response_overhead_bytes)
        self.net.up[self.n] = True

    def _make_proc(self, h: Host, trust: TrustedState, known_members: tuple[MemberEntry, ...] | None) -> Any:
        sc = self.sc
        assert h.ident is not None
        rng = random.Random(f"{self.seed}:node:{h.idx}:{self.net.epoch[h.idx]}")
        if sc.protocol == "gossip":
            node = Node(self.cfg, trust, h.node_id, h.ident.cert_bytes, h.ident.identity_seed, h.address,
                        self.seeds, rng, known_members or (), verify_cache=self.cache,
                        enforced=(trust.serial, ""))  # the boot apply of the persisted policy
            if h.hostile:
                return HostileNode(node, list(sc.hostile.behaviours), self.v1)
            return node
        if sc.protocol == "central-pull":
            return CentralPullAgent(trust, self.hosts[self.n].address, sc.baselines.pull_interval_ms,
                                    sc.baselines.request_bytes, rng)
        peers = getattr(self, "_flood_peers", None)
        if peers is None:
            peers = self._flood_peers = [(x.node_id, x.address) for x in self.hosts[: self.n]]
        return FloodNode(trust, h.node_id, peers, self.cfg.fanout, self.cfg.announce_rounds,
                         self.cfg.announce_interval_ms, rng, self_index=h.idx)

    def _trust_from_disk(self, h: Host) -> TrustedState:
        trust = TrustedState(self.anchor)
        trust.update_root_chain(h.persisted_roots)
        if h.persisted_policy is not None:
            trust.accept_policy(h.persisted_policy, self.wall(h.idx, self.now))
        return trust

    def _boot(self, i: int, _arg: Any) -> None:
        h = self.hosts[i]
        if h.persisted_policy is None:
            # enrolment hands every node the trust anchor and the current policy (serial 1)
            h.persisted_policy = self.v1
        trust = self._trust_from_disk(h)
        h.applied = trust.serial
        h.proc = self._make_proc(h, trust, h.persisted_members)
        h.started_ms = self.now
        if not self.net.up[i] and not h.hostile:
            self.live_honest += 1
        self.net.up[i] = True
        self.net.host_up[i] = True
        self._feed(i, TimerFired())

    # -- faults --------------------------------------------------------------------------------------
    def _faults(self) -> None:
        frng = self.rng("faults")
        for f in self.sc.faults:
            end = f.until_ms if f.until_ms is not None else NEVER
            label = f.name or f.kind
            self.fault_windows.append((f.at_ms, min(end, self.sc.duration_ms), label))
            if f.kind == "partition":
                side = bytearray(self.n + 1)
                if f.regions:
                    for h in self.hosts:
                        side[h.idx] = 1 if self.regions[h.region] in f.regions else 0
                else:
                    k = f.count or int(round(f.fraction * self.n))
                    for i in frng.sample(range(self.n), k):
                        side[i] = 1
                self.net.cuts.append(Cut(f.at_ms, end, side))
            elif f.kind == "loss":
                self.net.loss_windows.append((f.at_ms, end, f.loss))
            elif f.kind in ("region_outage", "crash"):
                if f.kind == "region_outage":
                    victims = [h.idx for h in self.hosts[: self.n] if self.regions[h.region] in f.regions]
                else:
                    k = f.count or int(round(f.fraction * self.n))
                    victims = sorted(frng.sample(range(self.n), k))
                blackhole = f.kind == "region_outage"
                for i in victims:
                    self._push(f.at_ms, ACTION, i, self._crash, blackhole)
                    if end != NEVER:
                        self._push(end, ACTION, i, self._restart, None)
                        if end <= self.sc.duration_ms:
                            self.restartable.add(i)
            elif f.kind == "authority_outage":
                self._push(f.at_ms, ACTION, self.n, self._authority_down, None)
                if end != NEVER:
                    self._push(end, ACTION, self.n, self._authority_up, None)

    def _crash(self, i: int, blackhole: bool) -> None:
        h = self.hosts[i]
        if not self.net.up[i]:
            return
        if not h.hostile:
            self.live_honest -= 1
        self.net.up[i] = False
        self.net.host_up[i] = not blackhole
        self.timer_at[i] = None
        for j in self.net.drop_node(i):
            delay = self.sc.tcp.user_timeout_ms if blackhole else int(self.net.one_way(i, j)) + 1
            self._push(self.now + delay, DISCONNECTED, j, i, None, self.net.epoch[j])
        h.proc = None
        self._crashed_serial[i] = h.applied

    def _restart(self, i: int, _arg: Any) -> None:
        h = self.hosts[i]
        if self.net.up[i] or h.proc is not None:
            return
        self.net.epoch[i] += 1
        self.disturb_end[i] = self.now
        before = self._crashed_serial.get(i, 0)
        self._boot(i, None)
        if h.applied < before:
            self.inv.violation(self.seed, self.now, f"{h.node_id} restarted enforcing serial {h.applied}, "
                                                    f"had {before}")

    def _authority_down(self, i: int, _arg: Any) -> None:
        self.net.up[i] = False
        self.net.host_up[i] = False

    def _authority_up(self, i: int, _arg: Any) -> None:
        self.net.up[i] = True
        self.net.host_up[i] = True
        self.net.epoch[i] += 1
        for v in self.versions:
            if v.published_at is None and v.publish_ms <= self.now:
                self._publish(0, v)

    # -- publishing and measurement ------------------------------------------------------------------
    def _publish(self, _i: int, v: Version) -> None:
        if not self.net.up[self.n]:
            return  # the authority is down: publish when it is back (see _authority_up)
        v.published_at = self.now
        v.snap_publish = self._snapshot()
        if v is self.versions[0] and hasattr(self, "idle_kinds"):
            dt = max(1, self.now - self.idle_snap_t) / 1000
            self.idle_by_kind = {KIND_NAMES[k]: round((self.kind_bytes[k] - self.idle_kinds[k]) / self.n / dt, 1)
                                 for k in sorted(KIND_NAMES) if self.kind_bytes[k] != self.idle_kinds[k]}
        self.hosts[self.n].proc.publish(v.envelope, v.hash)
        if self.sc.protocol == "central-pull":
            return
        prng = self.rng("publisher")
        region = self.sc.policy.publisher_region
        cands = [h.idx for h in self.hosts[: self.n] if self.net.up[h.idx] and not h.hostile
                 and (region is None or self.regions[h.region] == region)]
        if not cands:
            return
        target = prng.choice(cands)
        if self.sc.checks.convergence_bound_ms:
            self._push(self.now + self.sc.checks.convergence_bound_ms, ACTION, 0, self._check_bound, v)
        if v.twin is not None:
            # the same serial signed twice, published at the same moment through another node
            # (another region when there is one)
            others = [c for c in cands if self.hosts[c].region != self.hosts[target].region] or \
                [c for c in cands if c != target]
            if others:
                twin_target = prng.choice(others)
                self._feed(twin_target, PolicySubmitted(v.twin, "operator"))
        self._feed(target, PolicySubmitted(v.envelope, "operator"))

    def _check_bound(self, _i: int, v: Version) -> None:
        """The Byzantine guarantee: every honest node up since the publish applied it in the bound."""
        pub = v.published_at
        assert pub is not None
        up = self.net.up
        late = [h.node_id for h in self.hosts[: self.n]
                if up[h.idx] and not h.hostile and h.started_ms <= pub and h.idx not in v.applied]
        if late:
            self.inv.violation(self.seed, self.now, f"{len(late)} honest node(s) had not applied serial {v.serial} "
                                                    f"{self.sc.checks.convergence_bound_ms} ms after its publish "
                                                    f"(Byzantine bound), e.g. {late[:3]}")

    def _snapshot(self) -> list[int]:
        return [sum(self.recv_bytes[: self.n]), sum(self.recv_msgs[: self.n]), sum(self.recv_diss[: self.n])]

    def _snap_idle(self, _i: int, _a: Any) -> None:
        self.idle_snap = self._snapshot()
        self.idle_snap_t = self.now
        self.idle_kinds = list(self.kind_bytes)

    def _sample(self, _i: int, _a: Any) -> None:
        v = self._current_version()
        self.series_t.append(self.now)
        honest = getattr(self, "_honest_by_region", None)
        if honest is None:  # hostility is fixed before the run
            honest = self._honest_by_region = [[h for h in self.hosts[: self.n] if h.region == r and not h.hostile]
                                               for r in range(len(self.regions))]
        up = self.net.up
        for r, name in enumerate(self.regions):
            live = [h for h in honest[r] if up[h.idx]]
            if v is None or not live:
                self.series[name].append(0.0 if live else float("nan"))
            else:
                self.series[name].append(sum(1 for h in live if h.applied >= v.serial) / len(live))
        nxt = self.now + self.sc.measure.sample_ms
        if nxt <= self.sc.duration_ms:
            self._push(nxt, ACTION, 0, self._sample, None)

    def _current_version(self) -> Version | None:
        cur = None
        for v in self.versions:
            if v.published_at is not None:
                cur = v
        return cur

    # -- event loop ----------------------------------------------------------------------------------
    def _push(self, at: int, kind: int, i: int, a: Any = None, b: Any = None, c: Any = None) -> None:
        heapq.heappush(self.heap, ((at << SEQ_BITS) | self._next_seq(), kind, i, a, b, c))

    def wall(self, i: int, ms: int) -> float:
        return T0 + ms / 1000.0 + self.hosts[i].skew_s

    def run(self) -> dict[str, Any]:
        # Millions of long-lived small objects: the cyclic GC would rescan them all, again and again.
        gc.collect()
        gc.freeze()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if gc_was:
                gc.enable()
            gc.unfreeze()

    def _run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        end = self.sc.duration_ms
        bar = None
        if self.progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the [sim] extra is not installed: no progress bar
                tqdm = None
        if self.progress and tqdm is not None:
            bar = tqdm(total=end // 1000, unit="vs", desc=f"{self.sc.name} ({self.sc.protocol})",
                       file=sys.stderr, leave=False)
        shown = 0
        heap = self.heap
        pop = heapq.heappop
        net = self.net
        up, epoch, timer_at, ids = net.up, net.epoch, self.timer_at, self.ids
        recv_bytes, recv_msgs, recv_diss = self.recv_bytes, self.recv_msgs, self.recv_diss
        kind_bytes, kind_msgs = self.kind_bytes, self.kind_msgs
        overhead, mss, header = net._overhead, net._mss, net._header
        feed = self._feed
        events = self.events
        while heap:
            key, kind, i, a, b, c = pop(heap)
            at = key >> SEQ_BITS
            if at > end:
                break
            self.now = at
            if bar is not None and at // 1000 > shown:
                bar.update(at // 1000 - shown)
                shown = at // 1000
            if kind == DELIVER:  # a: sender, b: frame, c: receiver's epoch when sent
                if not up[i] or epoch[i] != c:
                    continue
                n = len(b) + overhead  # == net.wire_bytes(len(b))
                n += (1 + (n - 1) // mss) * header
                recv_bytes[i] += n
                recv_msgs[i] += 1
                k = b[1] if len(b) > 1 and 0x90 <= b[0] <= 0x9F else 0  # == frame_kind(b)
                if k >= NKINDS:
                    k = 0
                kind_bytes[k] += n
                kind_msgs[k] += 1
                if k in DISSEMINATION_TAGS:
                    recv_diss[i] += n
                inp: Any = FrameReceived(ids[a], b)
            elif kind == TIMER:
                if timer_at[i] != at or not up[i]:
                    continue
                timer_at[i] = None
                inp = TIMER_FIRED
            elif kind == CONNECTED:  # a: peer, b: its cert, c: epoch
                if not up[i] or epoch[i] != c:
                    continue
                inp = PeerConnected(ids[a], b)
            elif kind == DISCONNECTED:  # a: peer, c: epoch
                if not up[i] or epoch[i] != c:
                    continue
                inp = PeerDisconnected(ids[a])
            elif kind == SEND_FAILED:  # a: peer id, b: address, c: epoch
                if not up[i] or epoch[i] != c:
                    continue
                inp = SendFailed(a, b)
            else:  # ACTION: a(i, b)
                events += 1
                a(i, b)
                continue
            events += 1
            feed(i, inp)
        self.events = events
        self.now = end
        if bar is not None:
            bar.close()
        self.wall_s = time.perf_counter() - t0
        return self._finish()

    def _feed(self, i: int, inp: Any) -> None:
        h = self.hosts[i]
        proc = h.proc
        if proc is None:
            return
        now = self.now
        nw = self._now_obj
        skew = h.skew_s
        if nw.ms != now or self._now_skew != skew:  # Now is frozen: nodes may share one
            nw = self._now_obj = Now(now, T0 + now / 1000.0 + skew)  # == Now(now, self.wall(i, now))
            self._now_skew = skew
        effects = proc.handle(nw, inp)
        if effects:
            self._effects(h, effects)
        d = proc.next_deadline()
        if d is not None:
            if d < now:
                d = now
            if self.timer_at[i] != d:
                self.timer_at[i] = d
                heapq.heappush(self.heap, ((d << SEQ_BITS) | self._next_seq(), TIMER, i, None, None, None))

    def _effects(self, h: Host, effects: list) -> None:
        i = h.idx
        now = self.now
        net = self.net
        prev = None
        for eff in effects:
            if type(eff) is Enforce and type(prev) is PersistPolicy:  # a new policy, not new members
                serial = eff.policy.serial
                if i < self.n and self.sc.protocol == "gossip":
                    # the enforcer confirms what it loaded after apply_ms (RulesetApplied)
                    self._push(now + self.sc.nodes.apply_ms, ACTION, i, self._confirm,
                               (self.net.epoch[i], serial, eff.policy_hash))
                if i < self.n:
                    if not h.hostile:
                        h.applied = self.inv.check_effects(self.seed, now, h.node_id, h.applied, effects)
                    else:
                        h.applied = max(h.applied, serial)
                    self._converged(h)
                break
            prev = eff
        epoch = net.epoch
        for eff in effects:
            t = type(eff)
            if t is Send:
                peer = eff.peer
                j = self.by_id.get(peer) if peer else self.by_addr.get(eff.address)
                if j is None or j == i:
                    if j is None:
                        self._push(now + self.sc.tcp.connect_timeout_ms, SEND_FAILED, i, peer, eff.address,
                                   epoch[i])
                    continue
                data = eff.data
                if j in self.hostile_idx and not h.hostile and len(data) > 1 and data[1] == 7:
                    self.bodies_to_hostile += 1
                n = len(data) + net._overhead  # == net.wire_bytes(len(data))
                n += (1 + (n - 1) // net._mss) * net._header
                deliver, fail = net.transmit(i, j, n, now, self._on_connect, self._on_break)
                if deliver != NEVER:
                    deliver += self.process_ms
                    heapq.heappush(self.heap, ((deliver << SEQ_BITS) | self._next_seq(), DELIVER, j, i, data,
                                               epoch[j]))
                    if net.datagram:
                        dup = net.duplicate_delay(i, j)
                        if dup is not None:
                            self._push(deliver + dup, DELIVER, j, i, data, epoch[j])
                elif fail != NEVER:
                    self._push(fail, SEND_FAILED, i, peer, eff.address, epoch[i])
            elif t is PersistPolicy:
                h.persisted_policy = eff.envelope
            elif t is PersistRoot:
                h.persisted_roots.append(eff.envelope)
            elif t is PersistMembers:
                h.members_persisted = len(eff.entries)
                self.persisted_member_entries += h.members_persisted
                if i in self.restartable:
                    h.persisted_members = eff.entries
            elif t is Enforce:
                # eff.members may be the node's own dict (not a copy): read it, never mutate it
                self.inv.check_directory(self.seed, now, h.node_id, h.directory, eff.members)
                h.directory = eff.members
            elif t is LivenessChanged:
                if eff.liveness in ("dead", "suspect"):
                    self._detection(i, eff)
            elif t is Alert:
                self.alerts[eff.event] = self.alerts.get(eff.event, 0) + 1
            elif t is Disconnect:
                j = self.by_id.get(eff.peer)
                if j is not None and net.close(i, j):
                    self._push(now + int(net.one_way(i, j)) + 1, DISCONNECTED, j, i, None, epoch[j])
                    self._push(now, DISCONNECTED, i, j, None, epoch[i])

    def _confirm(self, i: int, arg: tuple[int, int, str]) -> None:
        epoch, serial, h = arg
        if self.net.up[i] and self.net.epoch[i] == epoch:
            self._feed(i, RulesetApplied(serial, "", h))

    def _on_connect(self, a: int, b: int, at: int) -> None:
        epoch = self.net.epoch
        self._push(at, CONNECTED, a, b, self.cert_of[b], epoch[a])
        self._push(at, CONNECTED, b, a, self.cert_of[a], epoch[b])

    def _on_break(self, a: int, b: int, at: int) -> None:
        epoch = self.net.epoch
        self._push(at, DISCONNECTED, a, b, None, epoch[a])
        self._push(at, DISCONNECTED, b, a, None, epoch[b])

    def _detection(self, i: int, eff: LivenessChanged) -> None:
        j = self.by_id.get(eff.node_id)
        if j is None:
            return
        dead = eff.liveness == "dead"
        if dead:
            self.deaths += 1
        if eff.source != self.hosts[i].node_id:
            return  # learned from gossip: counted where it originated
        if not self.net.up[j] or not self.net.reachable(i, j, self.now):
            return
        lookback = self.sc.checks.false_detection_lookback_ms
        last = max(self.disturb_end[j], self.disturb_end[i], self.hosts[j].started_ms, self.hosts[i].started_ms)
        for c in self.net.cuts:
            if c.side[i] != c.side[j] and c.start <= self.now:
                last = max(last, min(c.end, self.now))
        if self.now - last >= lookback or last == 0 and self.now >= lookback:
            if dead:
                self.false_detections += 1
            else:
                self.false_suspicions += 1

    def _converged(self, h: Host) -> None:
        if h.hostile:
            return
        for v in self.versions:
            if v.published_at is not None and h.applied >= v.serial and h.idx not in v.applied:
                v.applied[h.idx] = self.now + self.sc.nodes.apply_ms
                if v.done_ms is None and len(v.applied) >= self.live_honest:
                    up = self.net.up
                    if all(x.idx in v.applied for x in self.hosts[: self.n] if up[x.idx] and not x.hostile):
                        v.done_ms = max(v.applied.values())
                        v.snap_done = self._snapshot()

    # -- report --------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        sc = self.sc
        n = self.n
        live = [h for h in self.hosts[:n] if self.net.up[h.idx] and not h.hostile]
        versions = []
        for v in self.versions:
            versions.append(self._version_stats(v, live))
        last = versions[-1]
        # convergence after faults: every live node holds the last version at the end
        missing = [h.node_id for h in live if h.applied < self.versions[-1].serial]
        # Convergence after the faults end is an invariant of the gossip protocol; the baselines
        # promise no such thing, their shortfall is reported as converged_fraction.
        if sc.checks.require_convergence and sc.protocol == "gossip":
            if missing:
                self.inv.violation(self.seed, self.now, f"{len(missing)} live node(s) not converged to serial "
                                                        f"{self.versions[-1].serial} at the end, e.g. {missing[:3]}")
        equivocation = None
        lastv = self.versions[-1]
        if lastv.twin_hash is not None and sc.protocol == "gossip":
            keep = min(lastv.hash, lastv.twin_hash)
            other = [h.node_id for h in live if h.proc.trust.policy_hash != keep]
            if other and sc.checks.require_convergence:
                self.inv.violation(self.seed, self.now, f"{len(other)} live node(s) not on the lower hash of the "
                                                        f"equivocated serial {lastv.serial}, e.g. {other[:3]}")
            now = Now(self.now, self.wall(0, self.now))
            shown = sum(1 for h in live if h.proc.status(now)["convergence"]["state"] == "equivocation")
            equivocation = {"serial": lastv.serial, "kept": keep, "on_kept": len(live) - len(other),
                            "status_shows_equivocation": shown, "alerts": self.alerts.get("policy.equivocation", 0)}
        idle_bps = None
        if hasattr(self, "idle_snap") and self.versions[0].snap_publish is not None:
            dt = (self.versions[0].published_at or 0) - self.idle_snap_t
            if dt > 0:
                idle_bps = round((self.versions[0].snap_publish[0] - self.idle_snap[0]) / n / (dt / 1000), 1)
        node_hours = len(live) * sc.duration_ms / 3_600_000
        report: dict[str, Any] = {
            "scenario": sc.name,
            "protocol": sc.protocol,
            "seed": sc.seed,
            "nodes": n,
            "regions": self.regions,
            "loss": sc.network.loss,
            "transport": sc.network.transport,
            "policy_bytes": self.policy_bytes,
            "duration_ms": sc.duration_ms,
            "live_nodes": len(live),
            "not_converged_at_end": len(missing),
            "hostile_nodes": sum(1 for h in self.hosts[:n] if h.hostile),
            "hostile_behaviours": sorted(sc.hostile.behaviours) if self.hostile_idx else [],
            "bodies_to_hostile": self.bodies_to_hostile,
            "convergence_bound_ms": sc.checks.convergence_bound_ms or None,
            "equivocation": equivocation,
            "converged_fraction": last["converged_fraction"],
            "t50_ms": last["t50_ms"],
            "t99_ms": last["t99_ms"],
            "t100_ms": last["t100_ms"],
            "bytes_per_node": last["bytes_per_node"],
            "messages_per_node": last["messages_per_node"],
            "dissemination_bytes_per_node": last["dissemination_bytes_per_node"],
            "dissemination_bytes_per_node_max": last["dissemination_bytes_per_node_max"],
            "bytes_budget_per_node": int(1.2 * self.policy_bytes + 2048),
            "idle_bytes_per_node_s": idle_bps,
            "idle_bytes_per_node_s_by_kind": getattr(self, "idle_by_kind", {}),
            "run_bytes_per_node": round(sum(self.recv_bytes[:n]) / n, 1),
            "run_messages_per_node": round(sum(self.recv_msgs[:n]) / n, 1),
            "bytes_by_kind": {KIND_NAMES[k]: self.kind_bytes[k] for k in sorted(KIND_NAMES) if self.kind_bytes[k]},
            "serf_model_ms": SERF_MODEL_MS,
            "ratio_vs_serf_model": (round(last["t100_ms"] / SERF_MODEL_MS, 3)
                                    if last["t100_ms"] is not None else None),
            "false_detections": self.false_detections,
            "false_detections_per_node_hour": round(self.false_detections / node_hours, 4) if node_hours else 0.0,
            "false_suspicions": self.false_suspicions,
            "deaths_declared": self.deaths,
            "alerts": dict(sorted(self.alerts.items())),
            "faults": [{"name": name, "start_ms": s, "end_ms": e} for s, e, name in self.fault_windows],
            "versions": versions,
            "events": self.events,
            "wall_s": round(self.wall_s, 3),
            "invariant_violations": self.inv.count,
            "violations": self.inv.listed,
        }
        return report

    def _version_stats(self, v: Version, live: list[Host]) -> dict[str, Any]:
        n = self.n
        pub = v.published_at
        out: dict[str, Any] = {"serial": v.serial, "publish_ms": v.publish_ms, "published_at_ms": pub}
        if pub is None or not live:
            out.update(converged_fraction=0.0, t50_ms=None, t99_ms=None, t100_ms=None, bytes_per_node=None,
                       messages_per_node=None, dissemination_bytes_per_node=None,
                       dissemination_bytes_per_node_max=None, by_region={})
            return out
        times = sorted(v.applied[h.idx] - pub for h in live if h.idx in v.applied)
        frac = len(times) / len(live)

        def pct(p: float) -> int | None:
            need = math.ceil(p * len(live))
            return times[need - 1] if need <= len(times) and need > 0 else None

        snap_end = v.snap_done if v.snap_done is not None else self._snapshot()
        sp = v.snap_publish or [0, 0, 0]
        by_region = {}
        for r, name in enumerate(self.regions):
            lr = [h for h in live if h.region == r]
            tr = sorted(v.applied[h.idx] - pub for h in lr if h.idx in v.applied)
            by_region[name] = {"live": len(lr), "converged": len(tr),
                               "t100_ms": tr[-1] if lr and len(tr) == len(lr) else None}
        out.update(
            converged_fraction=round(frac, 6), t50_ms=pct(0.5), t99_ms=pct(0.99),
            t100_ms=times[-1] if len(times) == len(live) else None,
            bytes_per_node=round((snap_end[0] - sp[0]) / n, 1),
            messages_per_node=round((snap_end[1] - sp[1]) / n, 2),
            dissemination_bytes_per_node=round((snap_end[2] - sp[2]) / n, 1),
            dissemination_bytes_per_node_max=None,
            by_region=by_region,
        )
        return out


def run_scenario(sc: Scenario, progress: bool = False) -> tuple[dict[str, Any], Simulation]:
    sim = Simulation(sc, progress=progress)
    report = sim.run()
    return report, sim


def replay_hint(report: dict[str, Any]) -> str:
    return f"seed={report['seed']} scenario={report['scenario']} protocol={report['protocol']} nodes={report['nodes']}"


_unused: tuple[Callable[..., Any], ...] = (decode_policy, hashlib.sha256, TrustError)
