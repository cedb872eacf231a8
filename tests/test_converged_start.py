"""A converged start models a fleet that has been running (issue 14): what the shared converged
directory already holds is not announced again, while a node that starts without one (every daemon,
a simulated node that joins or restarts later) still announces its record and status."""

from __future__ import annotations

from protocol.gossip import Node
from protocol.gossip.broadcasts import BroadcastQueue
from protocol.gossip.member_base import ConvergedDirectory
from protocol.gossip.wire import Alive, GossipItem, Status, Suspect, decode
from simulations.engine import Simulation
from simulations.engine import converged_base as engine_converged_base
from simulations.fakelink import FakeLink
from simulations.scenario import load, override


def queued(node: Node) -> list[GossipItem]:
    """Everything the node's broadcast queue would still piggyback."""
    return list(BroadcastQueue.take(node.membership.broadcasts, 1 << 30, 1 << 30))


def own_items(node: Node) -> tuple[Alive, Status]:
    status = node.members.status_item_of(node.node_id)
    assert status is not None
    return Alive(node.membership.own.record), status


def started(n: int) -> FakeLink:
    link = FakeLink(n=n)
    link.start()  # each node signs its record and first status and queues both as gossip
    return link


def converged_base(nodes: list[Node]) -> ConvergedDirectory:
    """What the simulator builds (simulations.engine._converge): every node's own record and status."""
    return engine_converged_base(nodes, nodes[0]._now.wall)


def test_a_started_node_announces_its_record_and_status() -> None:
    """The daemon's behaviour, unchanged: no base, so the start announcements stay queued."""
    link = started(3)
    node = link.hosts["n0"].node
    assert set(own_items(node)) <= set(queued(node))


def test_adopting_the_converged_base_drops_exactly_what_it_holds() -> None:
    link = started(3)
    nodes = [h.node for h in link.hosts.values()]
    base = converged_base(nodes)
    n0, n1 = nodes[0], nodes[1]
    rumour = Suspect("n2", 1, "n0")  # something the base does not hold (it holds everyone alive)
    n0.membership.broadcasts.add(("m", "n2"), rumour)
    # n1 signs a newer status after the snapshot: the base holds its record, not that status
    n1.enforcement.publish(link.now().wall)
    _, newer = own_items(n1)
    assert n0.membership.adopt(base) == 2
    assert queued(n0) == [rumour]
    assert n1.membership.adopt(base) == 1
    assert queued(n1) == [newer]


def test_adopting_an_empty_base_drops_nothing() -> None:
    """Nodes booting side by side before the snapshot exists adopt an empty base first."""
    link = FakeLink(n=2)
    node = link.hosts["n0"].node
    node.membership.adopt(ConvergedDirectory.empty())
    link.start()
    assert node.membership.adopt(ConvergedDirectory.empty()) == 0
    assert set(own_items(node)) <= set(queued(node))


def test_the_drop_needs_the_same_bytes() -> None:
    q = BroadcastQueue()
    q.add(("m", "a"), Alive(b"record-a"))
    q.add(("s", "a"), Status(b"status-a", b"sig"))
    q.add(("m", "b"), Alive(b"record-b"))
    held = {"a": {Alive(b"record-a"), Status(b"status-a", b"other-sig")}, "b": {Alive(b"record-b2")}}
    assert q.drop_known(lambda node_id, item: item in held.get(node_id, ())) == 1
    assert len(q) == 2 and q.nbytes == sum(e.size for e in q._items.values())


def _gossip_items(data: bytes) -> tuple[GossipItem, ...]:
    return getattr(decode(data), "gossip", ())


def test_a_converged_fleet_is_quiet_until_something_happens() -> None:
    """In the simulator's converged start, the idle window carries probes and acks, and no record or
    status rides on them: every node holds them all already.  A node that joins later announces."""
    sc = override(load("internet"), nodes=60)
    sim = Simulation(sc)
    sim.kernel.run_until(0)  # boots and the snapshot
    assert sim.converged_base is not None
    converged = [p for p in sim.kernel.procs[: sim.n] if isinstance(p, Node)]
    assert len(converged) > 50
    for p in converged:
        assert not set(own_items(p)) & set(queued(p))
    start = sim.idle_start
    carried: list[GossipItem] = []
    kinds: set[str] = set()

    def on_frame(i: int, data: bytes) -> None:
        if sim.kernel.now >= start:
            msg = decode(data)
            kinds.add(type(msg).__name__)
            carried.extend(_gossip_items(data))

    sim.kernel.on_frame = on_frame
    sim.kernel.run_until(sim.versions[0].publish_ms - 1)
    assert {"Ping", "Ack"} <= kinds, kinds
    assert not kinds & {"Announce", "PolicyPull", "PolicyPush", "MemberPull", "Members", "SyncEntries"}, kinds
    assert carried == [], carried[:3]
    joiner = next(h for h in sim.hosts[: sim.n] if sim.kernel.procs[h.idx] is None)
    sim.kernel.run_until(sc.nodes.join_window_ms[1])
    node = sim.kernel.procs[joiner.idx]
    assert isinstance(node, Node) and node.members.base is None
    heard = [p for p in converged if p.members.rec(joiner.node_id) is not None]
    assert heard, "the joiner's record spreads"
