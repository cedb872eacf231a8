"""Piggybacked gossip: the queue of member rumours (records, suspicions, deaths, statuses) that ride
on probes, with a transmit limit (memberlist's TransmitLimitedQueue)."""

from __future__ import annotations

from .gossip_wire import MAX_GOSSIP_ITEMS, GossipItem, encode

MAX_BROADCASTS = 256
MAX_BROADCAST_BYTES = 512 << 10  # queued piggyback items, in encoded bytes


class BroadcastQueue:
    """Piggybacked gossip with a transmit limit (memberlist's TransmitLimitedQueue): a newer item about
    the same member replaces the older one; the least-transmitted items go first."""

    __slots__ = ("_items", "_order", "nbytes")

    def __init__(self) -> None:
        self._items: dict[object, list] = {}  # key -> [item, size, transmits, order]
        self._order = 0
        self.nbytes = 0  # encoded bytes queued (bounded by MAX_BROADCAST_BYTES)

    def add(self, key: object, item: GossipItem) -> None:
        self._order += 1
        size = len(encode(item))
        old = self._items.get(key)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = [item, size, 0, self._order]
        self.nbytes += size
        while len(self._items) > MAX_BROADCASTS or self.nbytes > MAX_BROADCAST_BYTES:
            worst = max(self._items.items(), key=lambda kv: (kv[1][2], -kv[1][3]))[0]
            self.nbytes -= self._items.pop(worst)[1]

    def __len__(self) -> int:
        return len(self._items)

    def take(self, budget: int, limit: int) -> tuple[GossipItem, ...]:
        if not self._items:
            return ()
        ranked = sorted(self._items.items(), key=lambda kv: (kv[1][2], -kv[1][3]))
        out: list[GossipItem] = []
        used = 0
        for key, entry in ranked:
            if used + entry[1] > budget:
                continue
            out.append(entry[0])
            used += entry[1]
            entry[2] += 1
            if entry[2] >= limit:
                del self._items[key]
                self.nbytes -= entry[1]
            if used >= budget - 16 or len(out) >= MAX_GOSSIP_ITEMS - 1:  # one slot stays free (buddy)
                break
        return tuple(out)
