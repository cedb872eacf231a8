"""A minimal lock-step harness: a few real ``protocol.node.Node`` objects over a fake link.

For unit and property tests of membership and dissemination through the façade (h11's
``tests/helpers.py`` shape).  Messages take a fixed latency, may be dropped by a predicate, and every
effect is recorded.  The full simulator (``simulations.engine``) adds the network model.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.gossip_config import GossipConfig
from protocol.gossip_events import (
    Disconnect,
    Enforce,
    FrameReceived,
    Now,
    PeerConnected,
    PeerDisconnected,
    PersistPolicy,
    RulesetApplied,
    Send,
    SendFailed,
    TimerFired,
)
from protocol.membership import VerifyCache
from protocol.node import Node
from protocol.trust import TrustedState

from .identities import T0, make_authority, make_node


def applied_policies(effects: list[Any]) -> list[Enforce]:
    """The ``Enforce`` of each newly accepted policy in ``effects``: the one right after its
    ``PersistPolicy`` (an ``Enforce`` on its own only updates the members)."""
    return [e for prev, e in zip(effects, effects[1:], strict=False)
            if isinstance(e, Enforce) and isinstance(prev, PersistPolicy)]


@dataclass
class Host:
    node_id: str
    node: Node
    address: str
    cert_bytes: bytes
    effects: list[Any] = field(default_factory=list)
    applied: list[Enforce] = field(default_factory=list)  # the Enforce of each newly accepted policy
    up: bool = True
    channels: set[str] = field(default_factory=set)
    enforces: bool = True  # its enforcer confirms every new policy (RulesetApplied) 1 ms later


class FakeLink:
    def __init__(self, n: int = 3, regions: list[str] | None = None, latency_ms: int = 5, seed: int = 1,
                 config: GossipConfig | None = None, seeds: int = 1, authority: Any = None) -> None:
        self.auth = authority or make_authority()
        self.cfg = config or GossipConfig()
        self.latency_ms = latency_ms
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.cache = VerifyCache()
        self.drop: Callable[[str, str, bytes], bool] = lambda src, dst, data: False
        self.hosts: dict[str, Host] = {}
        self.by_addr: dict[str, str] = {}
        regions = regions or ["r1"]
        idents = []
        for i in range(n):
            nid = f"n{i}"
            region = regions[i % len(regions)]
            ident = make_node(self.auth, nid, region=region, addresses=(f"10.0.0.{i + 1}",))
            idents.append((ident, region))
        seed_addrs = [f"10.0.0.{i + 1}:7946" for i in range(min(seeds, n))]
        for i, (ident, _region) in enumerate(idents):
            addr = f"10.0.0.{i + 1}:7946"
            trust = TrustedState(self.auth.root_bytes)
            node = Node(self.cfg, trust, ident.node_id, ident.cert_bytes, ident.identity_seed, addr, seed_addrs,
                        random.Random(seed * 1000 + i), verify_cache=self.cache)
            self.hosts[ident.node_id] = Host(ident.node_id, node, addr, ident.cert_bytes)
            self.by_addr[addr] = ident.node_id

    # -- driving -------------------------------------------------------------------------------------
    def now(self) -> Now:
        return Now(self.now_ms, T0 + self.now_ms / 1000)

    def _push(self, at: int, dst: str, inp: Any) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, dst, inp))

    def feed(self, nid: str, inp: Any) -> list[Any]:
        host = self.hosts[nid]
        if not host.up:
            return []
        effects = host.node.handle(self.now(), inp)
        host.effects.extend(effects)
        for eff in effects:
            if isinstance(eff, Send):
                self._route(nid, eff)
            elif isinstance(eff, Disconnect):
                if eff.peer in host.channels:
                    host.channels.discard(eff.peer)
                    self._push(self.now_ms, nid, PeerDisconnected(eff.peer))
        for eff in applied_policies(effects):
            host.applied.append(eff)
            if host.enforces:
                h = eff.policy_hash
                self._push(self.now_ms + 1, nid, RulesetApplied(eff.policy.serial, h[:16], h))
        d = host.node.next_deadline()
        if d is not None:
            self._push(max(d, self.now_ms), nid, TimerFired())
        return effects

    def _route(self, src: str, eff: Send) -> None:
        dst = eff.peer or self.by_addr.get(eff.address.rsplit(":", 1)[0] + ":7946") or self.by_addr.get(eff.address)
        if not dst or dst not in self.hosts or not self.hosts[dst].up or self.drop(src, dst, eff.data):
            self._push(self.now_ms + self.latency_ms, src, SendFailed(eff.peer, eff.address))
            return
        at = self.now_ms + self.latency_ms
        s, d = self.hosts[src], self.hosts[dst]
        if dst not in s.channels:
            s.channels.add(dst)
            d.channels.add(src)
            self._push(at, src, PeerConnected(dst, d.cert_bytes))
            self._push(at, dst, PeerConnected(src, s.cert_bytes))
        self._push(at, dst, FrameReceived(src, eff.data))

    def start(self) -> None:
        for nid in self.hosts:
            self.feed(nid, TimerFired())

    def run_until(self, t_ms: int) -> None:
        while self.queue and self.queue[0][0] <= t_ms:
            at, _, dst, inp = heapq.heappop(self.queue)
            self.now_ms = max(self.now_ms, at)
            if isinstance(inp, TimerFired):
                d = self.hosts[dst].node.next_deadline()
                if d is None or d > self.now_ms:
                    continue
            self.feed(dst, inp)
        self.now_ms = max(self.now_ms, t_ms)

    def run_for(self, ms: int) -> None:
        self.run_until(self.now_ms + ms)

    def crash(self, nid: str) -> None:
        host = self.hosts[nid]
        host.up = False
        for peer in sorted(host.channels):
            self.hosts[peer].channels.discard(nid)
            self._push(self.now_ms + self.latency_ms, peer, PeerDisconnected(nid))
        host.channels.clear()

    def serials(self) -> dict[str, int]:
        return {nid: h.node.trust.serial for nid, h in self.hosts.items()}
