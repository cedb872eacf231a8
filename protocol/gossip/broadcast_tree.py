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
    ring = sorted([ids[i] for i in mine] + [me]) if mine is not None else [me]
    pos = ring.index(me)
    tree: list[str] = []
    if pos > 0:
        tree.append(ring[(pos - 1) // degree])
    first = degree * pos + 1
    tree.extend(ring[first:first + degree])
    roots: list[str] = []
    if pos == 0:  # a region root: linked to every other region's root
        for region in sorted(table.alive):
            members = table.alive[region]
            if region != table.region and len(members):
                roots.append(min(ids[i] for i in members))
    return tree, roots
