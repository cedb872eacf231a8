"""A few real ``protocol.gossip.node.Node`` objects over a perfect link, for unit and property tests of the
core through its façade (h11's ``tests/helpers.py`` shape).

It is the simulator's kernel (``simulations.kernel``) and effect executor (``simulations.effects``)
with the simplest world around them: every message takes ``latency_ms``, unless the ``drop``
predicate refuses it (the sender gets ``SendFailed``); the first message between two nodes opens a
channel (both get ``PeerConnected``); each node's enforcer confirms every applied policy 1 ms later
(``RulesetApplied``) unless ``enforces`` is off.  What a node persists lands on its host's ``Disk``;
every effect is also recorded on its host (``effects``; ``applied``: the ``Enforce`` of each new policy,
as ``applied_policies`` picks them out of an effect list) for the tests to read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from protocol.gossip import (
    Alert,
    Enforce,
    FrameReceived,
    GossipConfig,
    LivenessChanged,
    Node,
    Now,
    PeerConnected,
    PeerDisconnected,
    RulesetApplied,
    Send,
    SendFailed,
    TimerFired,
)
from protocol.gossip.membership import VerifyCache
from protocol.trust import Certificate, TrustedState

from .effects import Disk, applied_policies, execute
from .identities import T0, make_authority, make_node
from .kernel import Kernel

ENFORCE_MS = 1  # the enforcer's confirmation delay


class Host:
    """One node on the link, with what it persisted and every effect it returned."""

    def __init__(self, link: FakeLink, idx: int, node_id: str, node: Node, address: str, cert_bytes: bytes) -> None:
        self._kernel = link.kernel
        self.idx = idx
        self.node_id = node_id
        self.node = node
        self.address = address
        self.cert_bytes = cert_bytes
        self.disk = Disk()
        self.effects: list[Any] = []
        self.applied: list[Enforce] = []  # the Enforce of each newly accepted policy
        self.channels: set[str] = set()
        self.enforces = True  # its enforcer confirms every new policy (RulesetApplied) 1 ms later

    @property
    def up(self) -> bool:
        """Down: the node gets nothing and messages to it fail (nobody is told)."""
        return self._kernel.up[self.idx]

    @up.setter
    def up(self, value: bool) -> None:
        self._kernel.up[self.idx] = value


class FakeLink:
    def __init__(self, n: int = 3, regions: list[str] | None = None, latency_ms: int = 5, seed: int = 1,
                 config: GossipConfig | None = None, seeds: int = 1, authority: Any = None) -> None:
        self.auth = authority or make_authority()
        self.cfg = config or GossipConfig()
        self.latency_ms = latency_ms
        self.kernel = Kernel(0, self._execute)
        self.cache = VerifyCache()
        self.drop: Callable[[str, str, bytes], bool] = lambda src, dst, data: False
        self.hosts: dict[str, Host] = {}
        self.by_addr: dict[str, str] = {}
        self._by_index: list[Host] = []
        regions = regions or ["r1"]
        seed_addrs = [f"10.0.0.{i + 1}:7946" for i in range(min(seeds, n))]
        for i in range(n):
            ident = make_node(self.auth, f"n{i}", region=regions[i % len(regions)], addresses=(f"10.0.0.{i + 1}",))
            addr = f"10.0.0.{i + 1}:7946"
            node = Node(self.cfg, TrustedState(self.auth.root_bytes), ident.node_id, ident.cert_bytes,
                        ident.identity_seed, addr, seed_addrs, random.Random(seed * 1000 + i), verify_cache=self.cache)
            self.add(ident.node_id, node, addr, ident.cert_bytes)

    def add(self, node_id: str, node: Node, address: str, cert_bytes: bytes) -> Host:
        """Put one more node on the link (up; ``start`` or a first input sets its timer)."""
        i = self.kernel.add_node()
        host = Host(self, i, node_id, node, address, cert_bytes)
        self.kernel.procs[i] = node
        self.kernel.up[i] = True
        self.hosts[node_id] = host
        self.by_addr[address] = node_id
        self._by_index.append(host)
        return host

    # -- driving -------------------------------------------------------------------------------------
    @property
    def now_ms(self) -> int:
        return self.kernel.now

    def now(self) -> Now:
        return Now(self.kernel.now, T0 + self.kernel.now / 1000)

    def feed(self, nid: str, inp: Any) -> list[Any]:
        """Hand ``inp`` to node ``nid`` now; returns its effects (already executed)."""
        return self.kernel.feed(self.hosts[nid].idx, inp)

    def start(self) -> None:
        for host in self._by_index:
            self.kernel.feed(host.idx, TimerFired())

    def run_until(self, t_ms: int) -> None:
        self.kernel.run_until(t_ms)

    def run_for(self, ms: int) -> None:
        self.run_until(self.kernel.now + ms)

    def crash(self, nid: str) -> None:
        """Node ``nid`` stops; its channels close and its peers are told after the latency."""
        host = self.hosts[nid]
        host.up = False
        for peer in sorted(host.channels):
            self.hosts[peer].channels.discard(nid)
            self.kernel.push(self.kernel.now + self.latency_ms, self.hosts[peer].idx, PeerDisconnected(nid))
        host.channels.clear()

    def serials(self) -> dict[str, int]:
        return {nid: h.node.trust.serial for nid, h in self.hosts.items()}

    # -- the World of simulations.effects ------------------------------------------------------------
    def _execute(self, i: int, effects: list[Any]) -> None:
        host = self._by_index[i]
        host.effects.extend(effects)
        execute(i, host.disk, effects, self)

    def apply_policy(self, i: int, eff: Enforce, effects: list[Any]) -> None:
        host = self._by_index[i]
        for new in applied_policies(effects):
            host.applied.append(new)
            if host.enforces:
                h = new.policy_hash
                self.kernel.push(self.kernel.now + ENFORCE_MS, i, RulesetApplied(new.policy.serial, h[:16], h))

    def send(self, i: int, eff: Send) -> None:
        src = self._by_index[i]
        dst = eff.peer or self.by_addr.get(eff.address.rsplit(":", 1)[0] + ":7946") or self.by_addr.get(eff.address)
        at = self.kernel.now + self.latency_ms
        d = self.hosts.get(dst) if dst else None
        if d is None or not d.up or self.drop(src.node_id, d.node_id, eff.data):
            self.kernel.push(at, i, SendFailed(eff.peer, eff.address))
            return
        if d.node_id not in src.channels:
            src.channels.add(d.node_id)
            d.channels.add(src.node_id)
            self.kernel.push(at, i, PeerConnected(d.node_id, d.cert_bytes))
            self.kernel.push(at, d.idx, PeerConnected(src.node_id, src.cert_bytes))
        self.kernel.push(at, d.idx, FrameReceived(src.node_id, eff.data))

    def disconnect(self, i: int, peer: str) -> None:
        host = self._by_index[i]
        if peer in host.channels:
            host.channels.discard(peer)
            self.kernel.push(self.kernel.now, i, PeerDisconnected(peer))

    def directory_changed(self, i: int, before: Mapping[str, Certificate] | None,
                          after: Mapping[str, Certificate]) -> None:
        pass  # kept on the host's Disk; tests read each Enforce from host.effects

    def liveness_changed(self, i: int, eff: LivenessChanged) -> None:
        pass  # recorded in host.effects

    def alert(self, i: int, eff: Alert) -> None:
        pass  # recorded in host.effects

    def write_failed(self, i: int) -> None:
        pass  # a fake link's disks are never full
