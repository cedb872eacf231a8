"""Piggybacked gossip: the queue of member rumours (records, suspicions, deaths, statuses) that ride
on probes, with a transmit limit (memberlist's TransmitLimitedQueue), and the encoding of every
outgoing message that puts them on the probes.  A record may be queued with a compact form (an
``AliveRef``, without the certificate: ``protocol.gossip.record_refs``), which goes instead to the
members whose record says they read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Send
from protocol.gossip.member_table import MemberTable
from protocol.gossip.wire import (
    MAX_GOSSIP_ITEMS,
    READS_RECORD_REFS,
    Ack,
    AliveRef,
    GossipItem,
    Ping,
    PingReq,
    Suspect,
    encode,
)
from protocol.trust.state import TrustedState

MAX_BROADCASTS = 256
MAX_BROADCAST_BYTES = 512 << 10  # queued piggyback items, in encoded bytes
PIGGYBACK_CARRIERS = (Ping, Ack, PingReq)  # the messages that carry gossip items
BUDDY_BYTES = 64  # an encoded Suspect item, with room to spare


class _Entry:
    """One queued item: its encoded size, how often it was sent, when it was queued (the newest go first
    among the least sent), and its compact form (an ``AliveRef``) with that size.  A slotted object:
    the simulator holds ~100 of them per node after churn, at 100,000 nodes."""

    __slots__ = ("item", "size", "transmits", "order", "compact", "csize")

    def __init__(self, item: GossipItem, size: int, order: int, compact: AliveRef | None, csize: int) -> None:
        self.item = item
        self.size = size
        self.transmits = 0
        self.order = order
        self.compact = compact
        self.csize = csize

    def rank(self) -> tuple[int, int]:
        return (self.transmits, -self.order)


class BroadcastQueue:
    """Piggybacked gossip with a transmit limit (memberlist's TransmitLimitedQueue): a newer item about
    the same member replaces the older one; the least-transmitted items go first.  ``compact``: the
    same record as an ``AliveRef``, taken instead of ``item`` for a peer that reads it (one transmit
    either way)."""

    __slots__ = ("_items", "_order", "nbytes")

    def __init__(self) -> None:
        self._items: dict[object, _Entry] = {}
        self._order = 0
        self.nbytes = 0  # encoded bytes queued (bounded by MAX_BROADCAST_BYTES)

    def add(self, key: object, item: GossipItem, compact: AliveRef | None = None) -> None:
        self.add_sized(key, item, len(encode(item)), compact, len(encode(compact)) if compact is not None else 0)

    def add_sized(self, key: object, item: GossipItem, size: int, compact: AliveRef | None, csize: int) -> None:
        """``add`` with the encoded sizes known (a member record's relay forms, computed once per
        record: ``record_refs.relay_forms``)."""
        self._order += 1
        if compact is None:
            csize = size
        old = self._items.get(key)
        if old is not None:
            self.nbytes -= old.size
        self._items[key] = _Entry(item, size, self._order, compact, csize)
        self.nbytes += size
        while len(self._items) > MAX_BROADCASTS or self.nbytes > MAX_BROADCAST_BYTES:
            worst = max(self._items.items(), key=lambda kv: kv[1].rank())[0]
            self.nbytes -= self._items.pop(worst).size

    def __len__(self) -> int:
        return len(self._items)

    def drop_known(self, known: Callable[[str, GossipItem], bool]) -> int:
        """Drop the queued items that every peer holds already: ``known(node_id, item)`` is asked of
        each item about a member (keys ``(kind, node_id)``).  Returns how many were dropped."""
        gone = [key for key, entry in self._items.items()
                if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str) and known(key[1], entry.item)]
        for key in gone:
            self.nbytes -= self._items.pop(key).size
        return len(gone)

    def take(self, budget: int, limit: int, refs: bool = False) -> tuple[GossipItem, ...]:
        """Items for one message within ``budget`` encoded bytes; ``refs``: the receiver reads
        ``AliveRef`` items (records go in their compact form where they have one)."""
        if not self._items:
            return ()
        ranked = sorted(self._items.items(), key=lambda kv: kv[1].rank())
        out: list[GossipItem] = []
        used = 0
        for key, entry in ranked:
            compact = entry.compact if refs else None
            size = entry.size if compact is None else entry.csize
            if used + size > budget:
                continue
            out.append(entry.item if compact is None else compact)
            used += size
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._items[key]
                self.nbytes -= entry.size
            if used >= budget - 16 or len(out) >= MAX_GOSSIP_ITEMS - 1:  # one slot stays free (buddy)
                break
        return tuple(out)


class Piggyback:
    """Encodes outgoing messages: probes carry gossip items from the queue and the (root version,
    serial) of our policy."""

    def __init__(self, config: GossipConfig, trust: TrustedState, table: MemberTable, queue: BroadcastQueue
                 ) -> None:
        self.cfg = config
        self.trust = trust
        self.table = table
        self.queue = queue

    def send(self, peer: str, msg: Any) -> Send:
        """The ``Send`` of ``msg`` to ``peer``.  Lifeguard's buddy system: a ping to a member we
        suspect carries that suspicion first, so the member hears of it (and refutes) even when the
        queue is crowded after a heal."""
        r = self.table.rec(peer)
        if isinstance(msg, PIGGYBACK_CARRIERS):
            buddy = self.table.suspicion_item(peer) if isinstance(msg, Ping) else None
            budget = self.cfg.gossip_budget_bytes - (BUDDY_BYTES if buddy is not None else 0)
            queue = self.queue
            refs = r is not None and bool(r.features & READS_RECORD_REFS)
            items = queue.take(budget, self.cfg.retransmit_limit(self.table.count), refs) if len(queue) else ()
            if buddy is not None:
                items = (buddy, *(x for x in items if not (isinstance(x, Suspect) and x.node_id == peer)))
            pol = self.trust.policy if isinstance(msg, (Ping, Ack)) else None
            root_v, serial = (pol.root_version, pol.serial) if pol is not None else (0, 0)
            if items or serial:
                msg = msgspec.structs.replace(msg, gossip=items, serial=serial, root_version=root_v) if serial \
                    else msgspec.structs.replace(msg, gossip=items)
        return Send(peer, r.address if r is not None else "", encode(msg))
