"""The broadcast tree: which peers a new policy body is pushed to at once (eager push).

A version crossing a hop as announce -> pull -> push takes three one-way trips, each exposed to loss
(a lost single-segment message waits ~200 ms for TCP's tail-loss probe or retransmission timeout).
Pushed along a tree it takes one trip per hop, and each node still receives the body about once.
This follows Plumtree (Leitão, Pereira, Rodrigues, "Epidemic Broadcast Trees", SRDS 2007): eager push
along a spanning tree, lazy announces to other peers, and a pull ("graft") from whoever announced when
the tree did not deliver.  Plumtree learns its tree from duplicates over many broadcasts; policy
versions are rare, so here the tree is computed, not learned:

* Every node derives the same undirected tree from the member directory it already holds: per region,
  the alive members (and itself) sorted by node id form a ``degree``-ary heap (member ``i``'s parent is
  ``(i - 1) // degree``); the heap roots of all regions are linked to each other, so a version crosses
  between two regions in one hop.
* A node that accepts a version pushes it to its tree neighbours except the one it came from (and
  peers known to hold it already; a root that got it from another root leaves the other roots to
  that one); whoever it came from, the flood covers the tree once.  Where two
  views of the directory differ, a node may get a second copy (dropped cheaply as a duplicate) or
  none from the tree (then the lazy path delivers it: announces, probes carrying the serial, and
  anti-entropy, as without the tree).
* Nothing here is trusted more than before: a pushed body is verified like a pulled one, and a
  withholding or absent tree neighbour costs its subtree one pull from any honest announcer, after
  which the puller pushes on down its own part of the tree.

The tree neighbours' channels are kept open (``neighbours`` is also what the node warms), so a push
does not wait for a dial (three round trips, a lost SYN waits a second).
"""

from __future__ import annotations

from bisect import bisect_left

from protocol.gossip.member_table import MemberTable


def tree_neighbours(table: MemberTable, degree: int) -> list[str]:
    """This node's neighbours in the broadcast tree over the alive members it knows (see the module
    docstring), in a stable order: parent, children, then the other regions' roots."""
    tree, roots = _neighbours(table, degree)
    return tree + roots


def push_targets(table: MemberTable, degree: int, sender: str | None) -> list[str]:
    """Where a body received from ``sender`` (None: a local source) goes next: every tree neighbour but
    the sender, and not to the other regions' roots when the sender is one of them (it pushed to them
    all itself), so the roots' links carry each version once."""
    tree, roots = _neighbours(table, degree)
    if sender in roots:
        return tree
    return [p for p in tree + roots if p != sender]


def _neighbours(table: MemberTable, degree: int) -> tuple[list[str], list[str]]:
    """(tree neighbours, other regions' roots), remembered until the alive sets change (a sort of the
    region's alive members per call: asked at every housekeeping and every accepted version)."""
    memo = table.tree_memo
    if memo is not None and memo[0] == table.alive_version and memo[1] == degree:
        return list(memo[2]), list(memo[3])
    tree, roots = _compute(table, degree)
    table.tree_memo = (table.alive_version, degree, tuple(tree), tuple(roots))
    return tree, roots


def _compute(table: MemberTable, degree: int) -> tuple[list[str], list[str]]:
    ids = table.ids
    me = table.me
    mine = table.alive.get(table.region)
    ring: _RankedRing | _SortedRing | None = _RankedRing.over_base(table, mine)
    if ring is None:
        ring = _SortedRing(sorted([ids[i] for i in mine] + [me]) if mine is not None else [me])
    pos = ring.rank(me)
    tree: list[str] = []
    if pos > 0:
        tree.append(ring.at((pos - 1) // degree))
    first = degree * pos + 1
    tree.extend(ring.at(r) for r in range(first, min(first + degree, len(ring))))
    roots: list[str] = []
    if pos == 0:  # a region root: linked to every other region's root
        for region in sorted(table.alive):
            members = table.alive[region]
            if region != table.region and len(members):
                roots.append(min(ids[i] for i in members))
    return tree, roots


class _SortedRing:
    """The region's ring as a sorted list (O(m log m) to build: the daemon, and tables without a base)."""

    __slots__ = ("ring",)

    def __init__(self, ring: list[str]) -> None:
        self.ring = ring

    def __len__(self) -> int:
        return len(self.ring)

    def rank(self, node_id: str) -> int:
        return self.ring.index(node_id)

    def at(self, r: int) -> str:
        return self.ring[r]


# base alive set (by identity; immutable, see ConvergedDirectory) -> (the set, its members' ids sorted)
_BASE_RINGS: dict[int, tuple[object, list[str]]] = {}


class _RankedRing:
    """The same ring over a shared converged base (a simulator hosting many nodes): the base's alive
    members sorted once for every table, and this table's few differences (members it believes dead
    or gone, members that joined since) as two small sorted lists.  A rank is three bisections; the
    ring is never built (a 10,000-member region costs a sort per node per change otherwise)."""

    __slots__ = ("base", "removed", "gone", "added", "n")

    def __init__(self, base: list[str], removed: list[str], added: list[str]) -> None:
        self.base = base  # sorted
        self.removed = removed  # sorted, a subset of base
        self.gone = frozenset(removed)
        self.added = added  # sorted, disjoint from base
        self.n = len(base) - len(removed) + len(added)

    @classmethod
    def over_base(cls, table: MemberTable, mine: object) -> _RankedRing | None:
        """The ring of ``mine`` (the table's alive set of its region) if it is an overlay over a base
        set with few differences and without ourselves (else None: sort it)."""
        from protocol.gossip.member_base import OverlayIntSet

        if type(mine) is not OverlayIntSet or table.base is None or table.me_index in mine:
            return None
        base_set = mine.base
        if mine.moved_count() > 64 + len(base_set) // 16:
            return None
        ids = table.ids
        got = _BASE_RINGS.get(id(base_set))
        if got is None or got[0] is not base_set:
            if len(_BASE_RINGS) > 64:
                _BASE_RINGS.clear()
            got = _BASE_RINGS[id(base_set)] = (base_set, sorted([ids[i] for i in base_set.items]))
        bp = base_set._pos
        removed: list[str] = []
        added: list[str] = []
        me = table.me_index
        moved = dict(mine.moved())
        for i, p in moved.items():
            in_base = 0 <= i < len(bp) and bp[i] >= 0
            if p < 0:
                if in_base and i != me:
                    removed.append(ids[i])
            elif not in_base:
                added.append(ids[i])
        if not (0 <= me < len(bp) and bp[me] >= 0):
            added.append(ids[me])  # the ring holds ourselves
        elif me not in moved:
            return None  # (the base set lacks a discard of ourselves: not a table's overlay)
        removed.sort()
        added.sort()
        return cls(got[1], removed, added)

    def __len__(self) -> int:
        return self.n

    def _below(self, node_id: str) -> int:
        """How many ring members sort before ``node_id``."""
        return (bisect_left(self.base, node_id) - bisect_left(self.removed, node_id)
                + bisect_left(self.added, node_id))

    def rank(self, node_id: str) -> int:
        return self._below(node_id)

    def at(self, r: int) -> str:
        for a in self.added:
            if self._below(a) == r:
                return a
        base, lo, hi = self.base, 0, len(self.base)
        while lo < hi:  # the first base member with r ring members before it
            mid = (lo + hi) // 2
            if self._below(base[mid]) < r:
                lo = mid + 1
            else:
                hi = mid
        while base[lo] in self.gone:
            lo += 1
        return base[lo]
