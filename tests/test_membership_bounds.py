"""Peer-controlled memory in the member table, and incarnations (issue 10, items 5b and 6).

Every attack goes through the real ``Node`` façade (``Node.handle`` with ``FrameReceived`` from a
validly enrolled peer), and the effects are dropped instead of being routed over the fake link, so
that what stays allocated afterwards is what the node itself retains.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from protocol.errors import RemoteProtocolError
from protocol.gossip import Alert, Disconnect, FrameReceived, LeaveRequested, Node, Send
from protocol.gossip.membership import (
    MAX_BROADCAST_BYTES,
    MAX_RELAYS_PER_PEER,
    BroadcastQueue,
    VerifyCache,
)
from protocol.gossip.wire import (
    MAX_INCARNATION,
    Alive,
    Dead,
    MemberRecord,
    Members,
    Ping,
    PingReq,
    Status,
    StatusBody,
    Suspect,
    Sync,
    View,
    decode,
    encode,
)
from protocol.trust import encode_envelope, sign
from simulations.fakelink import FakeLink

MiB = 1 << 20


def joined(n: int = 3) -> FakeLink:
    link = FakeLink(n=n)
    link.start()
    link.run_for(8000)
    return link


def retained_bytes(attack: Callable[[], None]) -> int:
    """Bytes still allocated after ``attack`` (garbage collected before and after)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        attack()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def signed_record(node: Node, incarnation: int, address: str | None = None) -> bytes:
    rec = MemberRecord(node.node_id, incarnation, address or node.advertise, node.membership.own.cert_bytes)
    return encode_envelope(sign("member", encode(rec), [node.membership.own.identity_seed]))


def signed_status(node: Node, seq: int, state: str = "fresh") -> Status:
    payload = encode(StatusBody(node.node_id, seq, 1, b"\x01" * 8, b"", state))
    env = sign("member", payload, [node.membership.own.identity_seed])
    return Status(payload, env.signatures[0].sig)


def blamed(out: list, peer: str) -> bool:
    return any(isinstance(e, Disconnect) and e.peer == peer for e in out) and \
        any(isinstance(e, Alert) and e.event == "gossip.remote_error" for e in out)


# -- verify before cache ------------------------------------------------------------------------------
def test_status_items_about_non_members_are_dropped_before_anything_is_kept():
    link = joined()
    n0 = link.hosts["n0"].node
    entries = len(n0.cache)
    total = 100_000

    def attack() -> None:
        for k in range(0, total, 4096):
            items = tuple(Status(encode(StatusBody(f"ghost-{k + j}", 1, 1, b"\0" * 8, b"", "x" * 100)), b"\1" * 64)
                          for j in range(min(4096, total - k)))
            n0.handle(link.now(), FrameReceived("n1", encode(Members((), items))))

    kept = retained_bytes(attack)
    assert kept < MiB, f"{kept} bytes retained after {total} bogus status items"  # was 79 MiB
    assert len(n0.cache) <= entries and "ghost-7" not in n0.cache.index.of
    assert n0.membership.counters["status_unknown_member"] == total
    # an honest member's status still gets through
    n1 = link.hosts["n1"].node
    st = signed_status(n1, n1.membership.own.status_seq + 1)
    n0.handle(link.now(), FrameReceived("n2", encode(Members((), (st,)))))
    body = n0.members.status_of("n1")
    assert body is not None and body.seq == n1.membership.own.status_seq + 1


def test_status_with_a_bad_signature_about_a_member_is_refused_and_not_cached():
    link = joined()
    n0 = link.hosts["n0"].node
    body = n0.members.status_of("n1")
    assert body is not None
    entries = len(n0.cache)
    for k in range(200):
        bogus = Status(encode(StatusBody("n1", body.seq + 1 + k, 7, b"\0" * 8, b"", "fresh")), bytes([k]) * 64)
        out = n0.handle(link.now(), FrameReceived("n2", encode(Members((), (bogus,)))))
        assert blamed(out, "n2")
    assert len(n0.cache) == entries
    assert n0.members.status_of("n1") == body


def test_oversized_status_item_is_refused():
    link = joined()
    n0 = link.hosts["n0"].node
    n1 = link.hosts["n1"].node
    big = signed_status(n1, n1.membership.own.status_seq + 1, state="x" * 20_000)
    out = n0.handle(link.now(), FrameReceived("n1", encode(Members((), (big,)))))
    assert blamed(out, "n1")
    body = n0.members.status_of("n1")
    assert body is not None and body.state != big


def test_a_stale_record_is_dropped_before_any_signature_check():
    link = joined()
    n0 = link.hosts["n0"].node
    n1 = link.hosts["n1"].node
    entries = len(n0.cache)
    stale = signed_record(n1, n1.membership.own.incarnation - 1, "10.9.9.9:7946")
    assert n0.membership.records.learn_record(stale, link.now().ms, link.now().wall) is False
    assert len(n0.cache) == entries and n0.members.rec("n1").address == n1.advertise


# -- eviction of superseded records and statuses ------------------------------------------------------
def test_superseding_records_are_evicted_from_every_cache():
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    inc = n1.membership.own.incarnation
    total = 10_000
    envs = [signed_record(n1, inc + 1 + k) for k in range(total)]  # signed beforehand: not the node's memory

    def attack() -> None:
        for k, env in enumerate(envs):
            n0.handle(link.now(), FrameReceived("n1", encode(Ping(k + 1, "n0", (Alive(env),)))))

    kept = retained_bytes(attack)
    assert n0.members.rec("n1").incarnation == inc + total
    assert kept < MiB, f"{kept} bytes retained after {total} superseding records"  # was 25-37 MiB
    mine = [k for k in n0.cache._d if isinstance(k, tuple) and isinstance(k[0], bytes) and b"n1" in k[0]]
    assert len(mine) <= 1
    assert n0.members.liveness("n1") == "alive"


def test_superseding_statuses_are_evicted_from_every_cache():
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    seq = n1.membership.own.status_seq
    total = 10_000
    items = [signed_status(n1, seq + 1 + k) for k in range(total)]

    def attack() -> None:
        for k in range(0, total, 64):
            n0.handle(link.now(), FrameReceived("n1", encode(Members((), tuple(items[k:k + 64])))))

    kept = retained_bytes(attack)
    body = n0.members.status_of("n1")
    assert body is not None and body.seq == seq + total
    assert kept < MiB, f"{kept} bytes retained after {total} superseding statuses"
    assert sum(1 for k in n0.cache._d if isinstance(k, tuple) and k[0] == "st") <= len(link.hosts)


def test_an_expelled_member_leaves_nothing_in_the_cache():
    link = joined()
    n0 = link.hosts["n0"].node
    i = n0.members.index.of["n2"]
    assert ("r", i) in n0.cache._latest
    n0.members.remove("n2", "revoked")
    assert ("r", i) not in n0.cache._latest and ("s", i) not in n0.cache._latest


def test_verify_cache_is_bounded_in_bytes():
    cache = VerifyCache(max_bytes=64 << 10)
    for k in range(10_000):
        cache.put(("cert", k), object(), 1024)
        assert cache.nbytes <= cache.max_bytes
    assert cache.clears > 0 and len(cache) <= 64
    # one entry per member and kind: a newer version supersedes, an older one is not held; what is
    # let go stays findable only while something else (a member table) still holds it
    class V:
        pass

    a, b, c = V(), V(), V()
    assert cache.put_member("r", 1, 5, "a", a, 100)
    assert cache.put_member("r", 1, 6, "b", b, 100)
    assert not cache.put_member("r", 1, 4, "c", c, 100)
    assert cache.get("a") is None and cache.get("b") is b and cache.get("c") is None
    assert cache.weak_get("a") is a and cache.weak_get("c") is c
    del a, c
    gc.collect()
    assert cache.weak_get("a") is None and cache.weak_get("c") is None
    cache.forget_member(1)
    assert cache.get("b") is None


# -- other per-peer state -----------------------------------------------------------------------------
def test_relayed_probes_are_bounded_per_requester():
    link = joined()
    n0 = link.hosts["n0"].node
    out: list = []
    for k in range(500):
        out += n0.handle(link.now(), FrameReceived("n1", encode(PingReq(k, "n2", "10.0.0.3:7946"))))
    pings = [e for e in out if isinstance(e, Send) and e.peer == "n2" and isinstance(decode(e.data), Ping)]
    assert len(pings) <= MAX_RELAYS_PER_PEER
    assert len(n0.membership.swim.relays) <= MAX_RELAYS_PER_PEER
    assert n0.membership.counters["relays_refused"] >= 500 - MAX_RELAYS_PER_PEER
    # another requester still gets its probe relayed
    out = n0.handle(link.now(), FrameReceived("n2", encode(PingReq(9, "n1", "10.0.0.2:7946"))))
    assert any(isinstance(e, Send) and e.peer == "n1" for e in out)
    link.run_for(10_000)  # relays expire and their budget comes back
    assert not n0.membership.swim.relays and not n0.membership.swim.relays_of


def test_broadcast_queue_is_bounded_in_bytes():
    q = BroadcastQueue()
    for k in range(1000):
        q.add(("m", f"n{k}"), Alive(bytes(7000)))
        assert q.nbytes <= MAX_BROADCAST_BYTES
    assert q.nbytes == sum(e.size for e in q._items.values())
    q.take(1 << 30, 1)
    assert q.nbytes == sum(e.size for e in q._items.values())


def test_suspicion_confirmations_come_only_from_members_and_names_are_capped():
    link = joined(4)
    n0 = link.hosts["n0"].node
    inc = n0.members.rec("n3").incarnation
    items = tuple(Suspect("n3", inc, f"ghost-{k}") for k in range(60))
    n0.handle(link.now(), FrameReceived("n1", encode(Ping(1, "n0", items))))
    s = n0.members.suspicions[n0.members.index.of["n3"]]
    assert s.sources == {"ghost-0"}  # it started the suspicion; no ghost counts as a confirmation
    n0.handle(link.now(), FrameReceived("n1", encode(Ping(2, "n0", (Suspect("n3", inc, "n2"),)))))
    assert s.sources == {"ghost-0", "n2"}
    with pytest.raises(RemoteProtocolError):
        decode(encode(Ping(3, "n0", (Suspect("n3", inc, "x" * 100_000),))))
    with pytest.raises(RemoteProtocolError):
        decode(encode(Ping(3, "n0", (Dead("y" * 65, inc, "n1"),))))


# -- incarnations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rumour", [Suspect, Dead])
def test_absurd_incarnation_about_us_is_refused_counted_and_blamed(rumour):
    link = joined()
    n0 = link.hosts["n0"].node
    inc = n0.membership.own.incarnation
    out = n0.handle(link.now(), FrameReceived("n1", encode(Ping(5, "n0", (rumour("n0", MAX_INCARNATION, "n1"),)))))
    assert n0.membership.own.incarnation == inc
    assert n0.membership.counters["absurd_incarnations"] == 1
    assert blamed(out, "n1")
    # an honest suspicion is still refuted, and leaving still signs an encodable record
    n0.handle(link.now(), FrameReceived("n2", encode(Ping(6, "n0", (Suspect("n0", inc, "n2"),)))))
    assert n0.membership.own.incarnation == inc + 1
    out = n0.handle(link.now(), LeaveRequested())
    assert n0.membership.own.incarnation == inc + 2 and n0.membership.own.left_cluster


def test_absurd_view_of_us_in_a_sync_is_refused():
    link = joined()
    n0 = link.hosts["n0"].node
    inc = n0.membership.own.incarnation
    sync = Sync(False, None, n0.trust.root_version, b"\0" * 8, b"", View(MAX_INCARNATION, "suspect"))
    out = n0.handle(link.now(), FrameReceived("n1", encode(sync)))
    assert n0.membership.own.incarnation == inc and blamed(out, "n1")


def test_a_previous_life_within_the_slack_is_still_moved_past():
    link = joined()
    n0 = link.hosts["n0"].node
    inc = n0.membership.own.incarnation
    n0.handle(link.now(), FrameReceived("n1", encode(Ping(5, "n0", (Suspect("n0", inc + 10**9, "n1"),)))))
    assert n0.membership.own.incarnation == inc + 10**9 + 1
    assert n0.membership.counters["absurd_incarnations"] == 0


def test_incarnation_saturates_at_the_wire_maximum():
    link = joined()
    n0 = link.hosts["n0"].node
    n0.membership.own.incarnation = MAX_INCARNATION - 1
    n0.handle(link.now(), FrameReceived("n1", encode(Ping(5, "n0", (Suspect("n0", MAX_INCARNATION - 1, "n1"),)))))
    assert n0.membership.own.incarnation == MAX_INCARNATION
    out = n0.handle(link.now(), FrameReceived("n1", encode(Ping(6, "n0", (Suspect("n0", MAX_INCARNATION, "n1"),)))))
    assert n0.membership.own.incarnation == MAX_INCARNATION and n0.membership.counters["incarnation_saturated"] == 1
    assert not blamed(out, "n1")
    out = n0.handle(link.now(), LeaveRequested())  # the SIGTERM path: no exception, an encodable record
    assert n0.membership.own.incarnation == MAX_INCARNATION and n0.membership.own.left_cluster
    assert any(isinstance(e, Send) for e in out)


def test_a_member_record_with_an_absurd_incarnation_is_refused():
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    inc = n0.members.rec("n1").incarnation
    out = n0.handle(link.now(), FrameReceived("n1", encode(Ping(5, "n0", (Alive(signed_record(n1, MAX_INCARNATION)),)))))
    assert blamed(out, "n1")
    assert n0.members.rec("n1").incarnation == inc
    assert n0.membership.counters["absurd_incarnations"] == 1


def test_claims_cannot_ratchet_past_the_ceiling_in_leaps():
    # A liar may move us up to the ceiling once (a previous life could be there), then only one
    # step per claim at our own incarnation: 2^64 stays out of reach.
    link = joined()
    n0 = link.hosts["n0"].node
    ceiling = n0.membership.own.claim_ceiling
    n0.handle(link.now(), FrameReceived("n1", encode(Ping(5, "n0", (Suspect("n0", ceiling, "n1"),)))))
    assert n0.membership.own.incarnation == ceiling + 1
    out = n0.handle(link.now(), FrameReceived("n1", encode(Ping(6, "n0", (Suspect("n0", ceiling + 1000, "n1"),)))))
    assert n0.membership.own.incarnation == ceiling + 1 and blamed(out, "n1")
    n0.handle(link.now(), FrameReceived("n2", encode(Ping(7, "n0", (Suspect("n0", ceiling + 1, "n2"),)))))
    assert n0.membership.own.incarnation == ceiling + 2
