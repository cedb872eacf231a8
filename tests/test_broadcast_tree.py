"""The broadcast tree (eager push) through the Node façade over a fake link: every node derives the
same tree, a version crosses it with each node receiving the body once, a withholding tree neighbour
costs its subtree one pull (graft), and large envelopes are only announced."""

from __future__ import annotations

from collections import Counter

from protocol.gossip.broadcast_tree import tree_neighbours
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import PolicySubmitted, Send
from protocol.gossip.wire import Announce, PolicyPull, PolicyPush, decode
from simulations.fakelink import FakeLink
from tests.fixtures import sign_sample

REGIONS = ["a", "b", "c"]


def joined(n: int, cfg: GossipConfig, regions: list[str] = REGIONS) -> FakeLink:
    link = FakeLink(n=n, regions=regions, config=cfg)
    link.start()
    link.run_for(10_000)
    return link


def sent(link: FakeLink, kind: type, since: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """(sender, receiver) of every message of ``kind`` sent (after ``since[node]`` effects)."""
    out = []
    for nid, h in link.hosts.items():
        for e in h.effects[(since or {}).get(nid, 0):]:
            if isinstance(e, Send) and isinstance(decode(e.data), kind):
                out.append((nid, e.peer))
    return out


def marks(link: FakeLink) -> dict[str, int]:
    return {nid: len(h.effects) for nid, h in link.hosts.items()}


def test_every_node_derives_the_same_spanning_tree():
    n, degree = 20, 3
    link = joined(n, GossipConfig(tree_degree=degree))
    nbrs = {nid: tree_neighbours(h.node.members, degree) for nid, h in link.hosts.items()}
    edges = {frozenset((a, b)) for a, bs in nbrs.items() for b in bs}
    # Symmetric: each edge is seen from both ends.
    assert all(a in nbrs[b] for a, bs in nbrs.items() for b in bs)
    # A tree per region (n - R edges) plus the region roots linked to each other (R (R-1) / 2).
    r = len(REGIONS)
    assert len(edges) == n - r + r * (r - 1) // 2
    # Connected: a flood from any node reaches all.
    seen, todo = {"n0"}, ["n0"]
    while todo:
        for b in nbrs[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    assert seen == set(link.hosts)
    # Bounded degree: a parent, `degree` children, and the other roots for a region root.
    assert max(len(b) for b in nbrs.values()) <= 1 + degree + r - 1


def test_a_version_crosses_the_tree_once_per_node_and_nobody_pulls():
    link = joined(20, GossipConfig(tree_degree=3))
    before = marks(link)
    link.feed("n7", PolicySubmitted(sign_sample(link.auth, 2), "operator"))
    link.run_for(5_000)
    assert set(link.serials().values()) == {2}
    received = Counter(dst for _, dst in sent(link, PolicyPush, before))
    assert set(received) == set(link.hosts) - {"n7"} and set(received.values()) == {1}
    assert not sent(link, PolicyPull, before)


def test_a_withholding_tree_neighbour_costs_its_subtree_one_pull():
    link = joined(20, GossipConfig(tree_degree=3))
    nbrs = {nid: tree_neighbours(h.node.members, 3) for nid, h in link.hosts.items()}
    # An inner node (a parent and three children, no region root) accepts what it receives but never
    # passes a body on: a withholding tree parent.
    bad = next(nid for nid, b in sorted(nbrs.items()) if len(b) == 4 and nid != "n0")
    link.drop = lambda src, dst, data: src == bad and isinstance(decode(data), PolicyPush)
    before = marks(link)
    link.feed("n0", PolicySubmitted(sign_sample(link.auth, 2), "operator"))
    link.run_for(10_000)
    assert set(link.serials().values()) == {2}
    pulls = sent(link, PolicyPull, before)
    assert pulls, "the subtree below n4 was repaired by pulls"
    # A pull per node cut off at most (the grafted node pushes on down its own part of the tree).
    assert len({src for src, _ in pulls}) <= len(nbrs[bad])
    # Besides the withholding node (its grafted children push back up to it), nobody gets a third copy.
    received = Counter(dst for _, dst in sent(link, PolicyPush, before))
    assert max(v for k, v in received.items() if k != bad) <= 2


def test_large_envelopes_are_announced_and_pulled_not_pushed_unasked():
    link = joined(8, GossipConfig(eager_push_max_bytes=64))
    before = marks(link)
    effects = link.feed("n0", PolicySubmitted(sign_sample(link.auth, 2), "operator"))
    first = [decode(e.data) for e in effects if isinstance(e, Send)]
    assert first and all(isinstance(m, Announce) for m in first)
    link.run_for(5_000)
    assert set(link.serials().values()) == {2}
    assert len(sent(link, PolicyPush, before)) == len(sent(link, PolicyPull, before))
