"""One member reconciliation at a time (protocol.gossip.antientropy, issue 14): a node that joins
through many seeds answering at once pulls the directory about once, not from every seed; a peer that
does not answer, or keeps answering, holds the waiting replies up for a bounded time only."""

from __future__ import annotations

from protocol.gossip.antientropy import RECONCILE_MAX_MS, bucket_hashes
from protocol.gossip.events import FrameReceived, Send
from protocol.gossip.wire import Members, Sync, SyncEntries, decode, encode
from simulations.fakelink import FakeLink

SEEDS = 7
N = 12  # n0..n6 are the seeds; n11 joins


def cluster_and_joiner(drop_from: str | None = None) -> tuple[FakeLink, list[int]]:
    """n0..n10 formed; n11 joins, its first join sync lost, so its lonely retry goes to every seed at
    once.  Returns the link and the record count of every ``Members`` n11 receives."""
    link = FakeLink(n=N, seeds=SEEDS)
    joiner = link.hosts[f"n{N - 1}"]
    joiner.up = False
    link.start()
    link.run_for(15_000)
    assert all(link.hosts[f"n{i}"].node.members.count == N - 1 for i in range(N - 1))
    received: list[int] = []

    def on_frame(i: int, data: bytes) -> None:
        msg = decode(data)
        if i == joiner.idx and isinstance(msg, Members):
            received.append(len(msg.records))

    link.kernel.on_frame = on_frame
    lost = [False]

    def drop(src: str, dst: str, data: bytes) -> bool:
        if src == joiner.node_id and not lost[0]:
            lost[0] = True  # the join sync
            return True
        return drop_from is not None and src == drop_from and dst == joiner.node_id and \
            isinstance(decode(data), Members)

    link.drop = drop
    joiner.up = True
    link.kernel.start(joiner.idx, joiner.node)
    return link, received


def everyone() -> set[str]:
    return {f"n{i}" for i in range(N)}


def records_of(link: FakeLink, node_id: str) -> set[str]:
    return {r.node_id for r in link.hosts[node_id].node.members.records()}


def test_a_joiner_answered_by_every_seed_at_once_pulls_the_directory_about_once() -> None:
    link, received = cluster_and_joiner()
    link.run_for(4000)
    assert records_of(link, f"n{N - 1}") == everyone()
    # before: a directory from each of the seven seeds (about 7 x 11 records)
    assert 0 < sum(received) <= 2 * N, received


def test_a_seed_that_never_sends_members_delays_the_others_only_for_a_while() -> None:
    link, received = cluster_and_joiner(drop_from="n0")
    joiner = f"n{N - 1}"
    ae = link.hosts[joiner].node.anti_entropy
    link.run_for(2100)  # the lonely retry (2 s) and the seeds' answers
    assert ae.reconciling is not None and ae.reconciling[0] == "n0"
    assert len(ae.waiting) == SEEDS - 1
    assert records_of(link, joiner) != everyone()
    link.run_until(ae.reconciling[1] + 100)  # n0's answer never came: the next seed's turn
    assert ae.reconciling is None or ae.reconciling[0] != "n0"
    link.run_for(1000)
    assert records_of(link, joiner) == everyone()
    assert 0 < sum(received) <= 2 * N, received


def test_a_peer_that_keeps_sending_nothing_new_cannot_hold_the_others_up() -> None:
    link = FakeLink(n=3)
    link.start()
    link.run_for(8000)
    ae = link.hosts["n0"].node.anti_entropy
    now = link.now_ms
    held = link.hosts["n0"].node.members.record_of("n2")
    assert held is not None
    ae.reconciling = ("n1", now + 2400, now + RECONCILE_MAX_MS)
    ae.waiting["n2"] = (None, None)
    for k in range(10):  # a chatty n1 streams Members of what we hold, every 200 ms
        ae.on_members("n1", Members((held,)), now + 200 * k, link.now().wall + k / 5)
        assert ae.reconciling == ("n1", now + 2400, now + RECONCILE_MAX_MS)
    assert ae.due <= now + 2400
    ae.tick(now + 2400, None, 1)
    assert ae.reconciling is None and not ae.waiting  # (n2's empty reply had nothing to reconcile)


def test_a_sync_reply_nobody_asked_for_is_refused_and_counted() -> None:
    """A lying member pushes sync replies we never asked for (differing bucket values, as if its
    directory differed): they start no reconciliation and take no waiting place; a reply to a Sync
    we did send is reconciled."""
    link = FakeLink(n=3)
    link.start()
    link.run_for(8000)
    node = link.hosts["n0"].node
    ae = node.anti_entropy
    ae.asked.clear()
    ae.asked_any_until = 0
    zeros = tuple(bytes(8) for _ in bucket_hashes(node.members))  # every bucket "differs"
    reply = Sync(True, None, 0, b"\x01" * 8, b"", None, None, zeros, None)
    before = node.membership.counters["sync_replies_unasked"]
    for _ in range(20):
        out = node.handle(link.now(), FrameReceived(peer="n1", data=encode(reply)))
        assert not [e for e in out if isinstance(e, Send) and isinstance(decode(e.data), SyncEntries)]
    assert node.membership.counters["sync_replies_unasked"] == before + 20
    assert ae.reconciling is None and not ae.waiting
    ae.sync_peer("n1", link.now_ms, None, 0)  # now we ask n1
    node.outbox.clear()
    out = node.handle(link.now(), FrameReceived(peer="n1", data=encode(reply)))
    assert [e for e in out if isinstance(e, Send) and isinstance(decode(e.data), SyncEntries)]
    assert ae.reconciling is not None and ae.reconciling[0] == "n1"
