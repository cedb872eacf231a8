"""SWIM failure detection with the Lifeguard refinements.

* One probe at a time, round-robin over a shuffled ring of alive and suspect members: a direct ping,
  then ``indirect_probes`` ping-reqs through other members, then suspicion.
* Lifeguard: a local health multiplier (``health``) scales the probe interval and timeouts; it grows
  on failed probes and missing nacks and shrinks on acks.  The suspicion timeout starts at ``max``
  and shrinks towards ``min`` with independent confirmations (members only, at most k kept).  Relays
  send a nack when the target stays silent.
* Rumours (suspect, dead) about ourselves are refuted by ``OwnRecord``; a death claimed about a member
  we heard from a moment ago is downgraded to a suspicion so that it gets the time to refute.
* Dead members are never forgotten: they stay in the table (their certificates stay valid, so
  enforcement is unchanged) and the node retries them.

What the detector sends goes to ``outbox`` (already encoded, with piggybacked gossip), in order;
``next_deadline()`` is the earliest of its timers.  Relayed probes are capped in all and per requester.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.entropy import Entropy
from protocol.gossip.broadcasts import BroadcastQueue, Piggyback
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Effect
from protocol.gossip.member_table import (
    ALIVE_CODE,
    DEAD_CODE,
    LEFT_CODE,
    NEVER_HEARD_MS,
    SUSPECT_CODE,
    MemberTable,
    Suspicion,
)
from protocol.gossip.members import Rec
from protocol.gossip.own_record import OwnRecord
from protocol.gossip.wire import Ack, Dead, Nack, Ping, PingReq, Suspect

MAX_RELAYS = 256  # indirect probes relayed at once, in all
MAX_RELAYS_PER_PEER = 16  # ... and on behalf of one requester


@dataclass(slots=True)
class Probe:
    seq: int
    target: str
    started_ms: int
    direct_deadline_ms: int
    final_deadline_ms: int
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class Relay:
    """A ping we send on behalf of ``requester`` (an indirect probe)."""

    requester: str
    orig_seq: int
    nack_at_ms: int
    expire_ms: int
    nacked: bool = False


class LazyRing:
    """A random permutation of positions 0..n-1 (n = alive members + suspects when it was started),
    drawn one at a time."""

    __slots__ = ("alive_n", "suspects", "left", "_swaps")

    def __init__(self, alive_n: int, suspects: list[int]) -> None:
        self.alive_n = alive_n
        self.suspects = suspects
        self.left = alive_n + len(suspects)
        self._swaps: dict[int, int] = {}

    def draw(self, rng: Entropy) -> int:
        swaps = self._swaps
        j = rng.below(self.left)
        self.left -= 1
        k = self.left
        got = swaps.get(j, j)
        swaps[j] = swaps.pop(k, k)
        return got


class Swim:
    def __init__(self, config: GossipConfig, rng: Entropy, table: MemberTable, own: OwnRecord,
                 broadcasts: BroadcastQueue, piggyback: Piggyback, outbox: list[Effect], counters: dict[str, int],
                 connected: Callable[[str], bool]) -> None:
        self.cfg = config
        self.rng = rng
        self.table = table
        self.own = own
        self.broadcasts = broadcasts
        self.piggyback = piggyback
        self.outbox = outbox
        self.counters = counters
        self.connected = connected
        self.health = 0
        self._seq = 0
        self.probe: Probe | None = None
        self.next_probe_ms = 0
        self._ring = array("i")
        self._ring_pos = 0
        self._lazy: LazyRing | None = None
        self.relays: dict[int, Relay] = {}
        self.relays_of: dict[str, int] = {}  # requester -> relays open on its behalf

    def _send(self, peer: str, msg: Any) -> None:
        self.outbox.append(self.piggyback.send(peer, msg))

    def start(self, now_ms: int) -> None:
        self.next_probe_ms = now_ms + self.rng.below(self.cfg.probe_interval_ms)

    # -- rumours and suspicion -----------------------------------------------------------------------
    def _rumour_target(self, item: Suspect | Dead, now_ms: int) -> tuple[int, Rec, int] | None:
        """(index, record, liveness) of the member a suspect/dead rumour is about, if it still
        applies: a rumour about ourselves is refuted here, a stale or moot one is dropped."""
        if item.node_id == self.table.me:
            if item.incarnation >= self.own.incarnation:
                self.own.refute(now_ms, item.incarnation)
            return None
        i = self.table.index_of(item.node_id)
        if i is None:
            return None
        rec = self.table.recs[i]
        assert rec is not None
        code = self.table.liveness_codes[i]
        if item.incarnation < rec.incarnation or code in (DEAD_CODE, LEFT_CODE):
            return None
        return i, rec, code

    def on_suspect(self, item: Suspect, now_ms: int) -> None:
        target = self._rumour_target(item, now_ms)
        if target is None:
            return
        i, rec, code = target
        if code == ALIVE_CODE:
            self._suspect(i, rec, item.source, now_ms)
            return
        s = self.table.suspicions.get(i)
        # only a member counts as an independent confirmation (and only k of them are kept)
        if s is not None and item.source not in s.sources and len(s.sources) <= self.cfg.suspicion_confirmations \
                and self.table.index_of(item.source) is not None:
            s.sources.add(item.source)
            self._reset_suspicion_deadline(s)
            self.broadcasts.add(("m", rec.node_id), Suspect(rec.node_id, rec.incarnation, item.source))

    def on_dead(self, item: Dead, now_ms: int) -> None:
        target = self._rumour_target(item, now_ms)
        if target is None:
            return
        i, rec, code = target
        if now_ms - self.table.heard_ms.get(i, NEVER_HEARD_MS) < self.cfg.probe_interval_ms * 3:
            # We heard from it a moment ago (a death declared across a healed partition, say):
            # suspect it instead, so that it gets the time to refute.
            if code == ALIVE_CODE:
                self._suspect(i, rec, item.source, now_ms)
            return
        self.table.set_liveness(i, DEAD_CODE, now_ms, source=item.source)
        self.broadcasts.add(("m", rec.node_id), Dead(rec.node_id, rec.incarnation, item.source))

    def _suspect(self, i: int, rec: Rec, source: str, now_ms: int) -> None:
        """Start suspecting an alive member, and spread the suspicion."""
        self.counters["suspicions"] += 1
        s = self.table.suspicions[i] = Suspicion({source}, now_ms)
        self.table.set_liveness(i, SUSPECT_CODE, now_ms, source=source)
        self._reset_suspicion_deadline(s)
        self.broadcasts.add(("m", rec.node_id), Suspect(rec.node_id, rec.incarnation, source))

    def _reset_suspicion_deadline(self, s: Suspicion) -> None:
        lo, hi = self.cfg.suspicion_bounds_ms(self.table.count)
        k = self.cfg.suspicion_confirmations
        confirmations = max(0, len(s.sources) - 1)
        if k <= 0:
            timeout = lo
        else:
            frac = math.log(confirmations + 1) / math.log(k + 1)
            timeout = max(lo, int(hi - (hi - lo) * frac))
        s.deadline_ms = s.start_ms + timeout

    # -- probing -------------------------------------------------------------------------------------
    def _timeout_for(self, target: Rec | None) -> int:
        base = self.cfg.probe_timeout_ms
        if target is not None and target.region != self.table.region:
            base = self.cfg.cross_region_probe_timeout_ms
        dial = 0 if target is None or self.connected(target.node_id) else self.cfg.dial_allowance_ms
        return base * (1 + self.health) + dial

    def _next_target(self) -> Rec | None:
        if self.table.base is not None:
            return self._next_target_lazy()
        codes = self.table.liveness_codes
        for _ in range(2):
            ring = self._ring
            while self._ring_pos < len(ring):
                i = ring[self._ring_pos]
                self._ring_pos += 1
                if i < len(codes) and codes[i] in (ALIVE_CODE, SUSPECT_CODE):
                    return self.table.recs[i]
            ring = array("i", self.table.alive_all.items)
            ring.extend(self.table.suspicions)
            self.rng.shuffle(ring)
            self._ring = ring
            self._ring_pos = 0
            if not ring:
                return None
        return None

    def _next_target_lazy(self) -> Rec | None:
        """The ring over a shared converged directory (a simulated node among n): drawn one position
        at a time (Fisher-Yates from the end, O(draws) memory) instead of an O(n) shuffled copy per
        node; each draw is the member at that position of the alive set now, or a suspect."""
        codes, table = self.table.liveness_codes, self.table
        for _ in range(2):
            ring = self._lazy
            while ring is not None and ring.left:
                p = ring.draw(self.rng)
                alive = table.alive_all
                i = alive.items[p] if p < len(alive) else (
                    ring.suspects[p - ring.alive_n] if ring.alive_n <= p < ring.alive_n + len(ring.suspects) else -1)
                if 0 <= i < len(codes) and codes[i] in (ALIVE_CODE, SUSPECT_CODE):
                    return table.recs[i]
            self._lazy = ring = LazyRing(len(table.alive_all), list(table.suspicions))
            if not ring.left:
                return None
        return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _health(self, delta: int) -> None:
        self.health = min(self.cfg.max_local_health, max(0, self.health + delta))

    def tick(self, now_ms: int) -> None:
        table = self.table
        # suspicion timeouts
        if table.suspicions:
            for i in [i for i, s in table.suspicions.items() if s.deadline_ms <= now_ms]:
                rec = table.recs[i]
                assert rec is not None
                self.counters["deaths_declared"] += 1
                table.set_liveness(i, DEAD_CODE, now_ms, source=table.me)
                self.broadcasts.add(("m", rec.node_id), Dead(rec.node_id, rec.incarnation, table.me))
        # relays: nack when the target stays silent
        if self.relays:
            for seq, r in list(self.relays.items()):
                if not r.nacked and now_ms >= r.nack_at_ms:
                    r.nacked = True
                    self._send(r.requester, Nack(r.orig_seq))
                if now_ms >= r.expire_ms:
                    self._drop_relay(seq)
        p = self.probe
        if p is not None:
            if not p.indirect_sent and now_ms >= p.direct_deadline_ms:
                self._send_indirect(p, now_ms)
            if now_ms >= p.final_deadline_ms:
                self._probe_failed(p, now_ms)
        if self.probe is None and now_ms >= self.next_probe_ms:
            self._start_probe(now_ms)

    def _start_probe(self, now_ms: int) -> None:
        interval = self.rng.jitter(self.cfg.probe_interval_ms * (1 + self.health), 0.05)
        self.next_probe_ms = now_ms + interval
        target = self._next_target()
        if target is None:
            return
        timeout = self._timeout_for(target)
        seq = self._next_seq()
        self.probe = Probe(seq, target.node_id, now_ms, now_ms + timeout, now_ms + 3 * timeout)
        self.counters["probes"] += 1
        self._send(target.node_id, Ping(seq, target.node_id))

    def _send_indirect(self, p: Probe, now_ms: int) -> None:
        p.indirect_sent = True
        table = self.table
        target = table.rec(p.target)
        if target is None or table.index_of(p.target) is None:
            return
        ti = target.idx
        relays: list[int] = []
        pool = table.alive.get(target.region)
        want = self.cfg.indirect_probes
        for source in (pool, table.alive_all):
            if source is None or len(relays) >= want:
                continue
            for i in self.rng.sample(source.items, 2 * want):
                if i not in (ti, table.me_index) and i not in relays:
                    relays.append(i)
                if len(relays) >= want:
                    break
        p.expected_nacks = len(relays)
        for i in relays:
            self._send(table.ids[i], PingReq(p.seq, target.node_id, target.address))

    def _probe_failed(self, p: Probe, now_ms: int) -> None:
        self.probe = None
        self.counters["probe_failures"] += 1
        missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self._health(max(missing, 0))
        i = self.table.index_of(p.target)
        if i is not None and self.table.liveness_codes[i] == ALIVE_CODE:
            rec = self.table.recs[i]
            assert rec is not None
            self._suspect(i, rec, self.table.me, now_ms)

    def probe_send_failed(self, peer: str, now_ms: int) -> None:
        p = self.probe
        if p is not None and p.target == peer and not p.indirect_sent:
            p.direct_deadline_ms = now_ms

    def on_ping(self, peer: str, msg: Ping) -> None:
        if msg.target == self.table.me:
            self._send(peer, Ack(msg.seq))

    def on_ping_req(self, peer: str, msg: PingReq, now_ms: int) -> None:
        if msg.target == self.table.me:
            self._send(peer, Ack(msg.seq))
            return
        n = self.relays_of.get(peer, 0)
        if len(self.relays) >= MAX_RELAYS or n >= MAX_RELAYS_PER_PEER:
            self.counters["relays_refused"] += 1  # the requester's probe fails, as over a lossy link
            return
        target = self.table.rec(msg.target)
        seq = self._next_seq()
        timeout = self._timeout_for(target)
        self.relays[seq] = Relay(peer, msg.seq, now_ms + timeout * 8 // 10, now_ms + 3 * timeout)
        self.relays_of[peer] = n + 1
        self._send(msg.target, Ping(seq, msg.target))

    def _drop_relay(self, seq: int) -> Relay | None:
        r = self.relays.pop(seq, None)
        if r is not None:
            n = self.relays_of.pop(r.requester) - 1
            if n:
                self.relays_of[r.requester] = n
        return r

    def on_ack(self, msg: Ack, now_ms: int) -> None:
        p = self.probe
        if p is not None and msg.seq == p.seq:
            self.probe = None
            self._health(-1)
            return
        r = self._drop_relay(msg.seq)
        if r is not None:
            self._send(r.requester, Ack(r.orig_seq))

    def on_nack(self, msg: Nack) -> None:
        p = self.probe
        if p is not None and msg.seq == p.seq:
            p.nacks += 1

    def next_deadline(self) -> int:
        p = self.probe
        d = self.next_probe_ms if p is None else min(
            p.final_deadline_ms, p.final_deadline_ms if p.indirect_sent else p.direct_deadline_ms)
        for s in self.table.suspicions.values():
            d = min(d, s.deadline_ms)
        for r in self.relays.values():
            d = min(d, r.expire_ms if r.nacked else r.nack_at_ms)
        return d
