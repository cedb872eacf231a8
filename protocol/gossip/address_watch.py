"""Which member advertises an address, kept O(1) for the few addresses looked up often.

A node retries its seeds by address (``AntiEntropy._retry_seeds``, on every retry interval): a scan
of the whole member table per retry would be O(n).  The member table tells the watch of every record
it installs or removes; the watch keeps, per watched address, the index of the member advertising it
(-1: nobody yet).  Any other address is found by a scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from protocol.gossip.members import Rec


class AddressWatch:
    __slots__ = ("watched",)

    def __init__(self) -> None:
        self.watched: dict[str, int] = {}  # address -> member index advertising it (-1: nobody yet)

    def __bool__(self) -> bool:
        return bool(self.watched)

    def __contains__(self, address: object) -> bool:
        return address in self.watched

    def watch(self, addresses: Iterable[str], records: Iterator[Rec]) -> None:
        """Watch ``addresses`` from now on (``records``: every record held now)."""
        w = self.watched
        for a in addresses:
            w.setdefault(a, -1)
        for r in records:
            if r.address in w:
                w[r.address] = r.idx

    def rebase(self, by_address: Mapping[str, int]) -> None:
        """The table adopted a converged directory: who advertises each watched address there."""
        for a in self.watched:
            self.watched[a] = by_address.get(a, -1)

    def changed(self, old: Rec | None, new: Rec | None) -> None:
        """A member's record ``old`` was replaced by ``new`` (None: installed, or removed)."""
        w = self.watched
        if old is not None and old.address in w and w[old.address] == old.idx and (new is None or new.address != old.address):
            w[old.address] = -1
        if new is not None and new.address in w:
            w[new.address] = new.idx

    def find(self, address: str, recs: Sequence[Rec | None], records: Iterator[Rec]) -> str | None:
        """The member (node id) advertising ``address``, if any (``recs``: the table's record column,
        ``records``: its records, scanned for an address that is not watched)."""
        i = self.watched.get(address)
        if i is not None:
            r = recs[i] if i >= 0 else None
            return r.node_id if r is not None and r.address == address else None
        for r in records:
            if r.address == address:
                return r.node_id
        return None
