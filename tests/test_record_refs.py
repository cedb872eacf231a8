"""Member records relayed without their certificate (``AliveRef``, protocol/gossip/record_refs.py).

Every check goes through the real ``Node`` façade (``FrameReceived`` from an enrolled peer) or the
real parts it is made of; the receiver rebuilds the exact signed bytes around the certificate it holds
and verifies them as a full record, refuses (and counts) a reference it cannot resolve, and blames the
peer for one that does not verify.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FormatError, RemoteProtocolError, SignatureError
from protocol.gossip import Alert, Disconnect, FrameReceived, Node, Send
from protocol.gossip.members import Rec
from protocol.gossip.record_refs import compact, rebuild
from protocol.gossip.wire import (
    CERT_REF_BYTES,
    MAX_ADDRESS_CHARS,
    READS_RECORD_REFS,
    Ack,
    Alive,
    AliveRef,
    MemberRecord,
    Ping,
    cert_ref,
    decode,
    decode_payload,
    encode,
    encode_record,
)
from protocol.trust import encode_envelope, sign
from protocol.trust.signing import decode_envelope
from simulations.fakelink import FakeLink
from simulations.identities import derive_seed, make_node


def joined(n: int = 3) -> FakeLink:
    link = FakeLink(n=n)
    link.start()
    link.run_for(8000)
    return link


def record(node: Node, incarnation: int, address: str | None = None, left: bool = False,
           features: int = READS_RECORD_REFS) -> bytes:
    own = node.membership.own
    rec = MemberRecord(node.node_id, incarnation, address or node.advertise, own.cert_bytes, left, features)
    return encode_envelope(sign("member", encode_record(rec), [own.identity_seed]))


def ref_of(data: bytes) -> AliveRef:
    """The ``AliveRef`` of a signed record (its fields, its signature, the name of its certificate)."""
    env = decode_envelope(data, "member")
    rec = decode_payload(env.payload)
    assert isinstance(rec, MemberRecord)
    return AliveRef(rec.node_id, rec.incarnation, rec.address, rec.left, rec.features, cert_ref(rec.cert),
                    env.signatures[0].sig)


def blamed(out: list, peer: str) -> bool:
    return any(isinstance(e, Disconnect) and e.peer == peer for e in out) and \
        any(isinstance(e, Alert) and e.event == "gossip.remote_error" for e in out)


def items_to(node: Node, peer: str) -> tuple:
    """The gossip items ``node`` piggybacks on its next probe to ``peer``."""
    send = node.membership.piggyback.send(peer, Ping(1, peer))
    assert isinstance(send, Send)
    msg = decode(send.data)
    assert isinstance(msg, Ping)
    return msg.gossip


# -- the wire -----------------------------------------------------------------------------------------
def test_a_record_without_features_is_written_as_the_first_release_wrote_it():
    class FirstRelease(msgspec.Struct, array_like=True, tag=1):
        node_id: str
        incarnation: int
        address: str
        cert: bytes
        left: bool = False

    old = msgspec.msgpack.encode(FirstRelease("n1", 7, "10.0.0.1:7946", b"cert", True))
    assert encode_record(MemberRecord("n1", 7, "10.0.0.1:7946", b"cert", True)) == old
    assert decode_payload(old) == MemberRecord("n1", 7, "10.0.0.1:7946", b"cert", True, 0)
    # a release before features reads a record that lists them (the trailing field is ignored)
    new = encode_record(MemberRecord("n1", 7, "10.0.0.1:7946", b"cert", False, READS_RECORD_REFS))
    assert msgspec.msgpack.decode(new, type=FirstRelease) == FirstRelease("n1", 7, "10.0.0.1:7946", b"cert", False)


@pytest.mark.parametrize("field, value", [
    ("cert_ref", b"\0" * (CERT_REF_BYTES - 1)), ("cert_ref", b"\0" * (CERT_REF_BYTES + 1)),
    ("sig", b"\0" * 63), ("sig", b"\0" * 65), ("address", "a" * (MAX_ADDRESS_CHARS + 1)),
    ("node_id", "n" * 65), ("incarnation", -1), ("features", -1), ("features", 1 << 32),
])
def test_every_field_of_a_reference_is_bounded_on_decode(field, value):
    good = AliveRef("n1", 5, "10.0.0.1:7946", False, 1, b"\1" * CERT_REF_BYTES, b"\2" * 64)
    assert decode(encode(Ping(1, "n0", (good,)))) == Ping(1, "n0", (good,))
    bad = msgspec.structs.replace(good, **{field: value})
    with pytest.raises(RemoteProtocolError):
        decode(encode(Ping(1, "n0", (bad,))))


# -- rebuild and verify -------------------------------------------------------------------------------
def test_compact_and_rebuild_give_back_the_exact_signed_bytes():
    link = joined()
    n1 = link.hosts["n1"].node
    rec = n1.members.rec("n1")
    assert rec is not None and rec.features & READS_RECORD_REFS
    item = compact(rec)
    assert item is not None and item.cert_ref == cert_ref(rec.cert_bytes)
    assert rebuild(item, rec.cert_bytes, rec.cert.identity_key) == rec.record
    assert len(encode(item)) * 3 < len(encode(Alive(rec.record)))


def test_a_reference_is_rebuilt_verified_and_learned():
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    inc = n1.membership.own.incarnation + 5
    data = record(n1, inc, "10.0.0.77:7946")
    out = link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (ref_of(data),)))))
    assert not blamed(out, "n2")
    got = n0.members.rec("n1")
    assert got is not None and got.incarnation == inc and got.address == "10.0.0.77:7946"
    assert got.record == data  # byte for byte what a full copy carries


def test_a_reference_that_is_not_newer_costs_nothing():
    link = joined()
    n0 = link.hosts["n0"].node
    held = n0.members.rec("n1")
    forged = msgspec.structs.replace(ref_of(held.record), address="10.6.6.6:1", sig=b"\0" * 64)
    out = link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (forged,)))))
    assert not blamed(out, "n2") and n0.members.rec("n1") is held  # not even checked: not newer


def test_a_reference_to_an_unknown_member_is_refused_and_counted():
    link = joined()
    n0 = link.hosts["n0"].node
    stranger = make_node(link.auth, "n9")
    rec = MemberRecord("n9", 5, "10.0.0.9:7946", stranger.cert_bytes, False, READS_RECORD_REFS)
    data = encode_envelope(sign("member", encode_record(rec), [stranger.identity_seed]))
    out = link.feed("n0", FrameReceived("n1", encode(Ping(1, "n0", (ref_of(data),)))))
    assert not blamed(out, "n1")  # not the relay's fault: we just do not hold that certificate
    assert "n9" not in n0.members
    assert n0.membership.counters["record_refs_unknown_member"] == 1
    # the full record (a join carries its certificate) is learned
    link.feed("n0", FrameReceived("n1", encode(Ping(2, "n0", (Alive(data),)))))
    assert "n9" in n0.members


def test_a_reference_to_another_certificate_is_refused_and_counted():
    """The member re-enrolled: its new record names a certificate the receiver does not hold."""
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    again = make_node(link.auth, "n1", addresses=("10.0.0.2",), label="re-enrolled")
    inc = n1.membership.own.incarnation + 1
    rec = MemberRecord("n1", inc, n1.advertise, again.cert_bytes, False, READS_RECORD_REFS)
    data = encode_envelope(sign("member", encode_record(rec), [again.identity_seed]))
    before = n0.members.rec("n1")
    out = link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (ref_of(data),)))))
    assert not blamed(out, "n2")
    assert n0.members.rec("n1") is before
    assert n0.membership.counters["record_refs_other_cert"] == 1
    # a reference claiming the held certificate for that record does not verify: forged
    lying = msgspec.structs.replace(ref_of(data), cert_ref=before.cert_ref)
    out = link.feed("n0", FrameReceived("n2", encode(Ping(2, "n0", (lying,)))))
    assert blamed(out, "n2") and n0.members.rec("n1") is before


@pytest.mark.parametrize("change", [
    {"address": "10.6.6.6:7946"}, {"left": True}, {"features": 0}, {"features": 3}, {"sig": b"\x07" * 64},
])
def test_a_reference_whose_rebuilt_record_does_not_verify_blames_the_relay(change):
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    before = n0.members.rec("n1")
    forged = msgspec.structs.replace(ref_of(record(n1, n1.membership.own.incarnation + 3)), **change)
    out = link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (forged,)))))
    assert blamed(out, "n2")
    assert n0.members.rec("n1") is before


def test_a_forged_reference_about_ourselves_does_not_move_our_incarnation():
    link = joined()
    n0 = link.hosts["n0"].node
    inc = n0.membership.own.incarnation
    forged = msgspec.structs.replace(ref_of(record(n0, inc + 10)), sig=b"\x01" * 64)
    out = link.feed("n0", FrameReceived("n1", encode(Ack(1, (forged,)))))
    assert blamed(out, "n1") and n0.membership.own.incarnation == inc


# -- who sends references -----------------------------------------------------------------------------
def test_a_relayed_update_goes_without_certificate_to_members_that_read_it_and_whole_to_others():
    link = joined(4)
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    # n3 runs a release before references: its record lists no features
    n3 = link.hosts["n3"].node
    old = record(n3, n3.membership.own.incarnation + 1, features=0)
    link.feed("n0", FrameReceived("n3", encode(Ping(1, "n0", (Alive(old),)))))
    assert n0.members.rec("n3").features == 0
    n0.membership.broadcasts.drop_known(lambda node_id, item: True)
    update = record(n1, n1.membership.own.incarnation + 1, "10.0.0.55:7946")
    link.feed("n0", FrameReceived("n2", encode(Ping(2, "n0", (Alive(update),)))))
    to_n2 = [x for x in items_to(n0, "n2") if getattr(x, "node_id", None) == "n1"]
    assert to_n2 == [ref_of(update)]
    to_n3 = [x for x in items_to(n0, "n3") if isinstance(x, Alive)]
    assert Alive(update) in to_n3 and not any(isinstance(x, AliveRef) for x in items_to(n0, "n3"))


def test_a_first_record_and_a_new_certificate_travel_whole():
    link = joined()
    n0 = link.hosts["n0"].node
    n0.membership.broadcasts.drop_known(lambda node_id, item: True)
    # our start record: whole, even to a member that reads references (a join carries its certificate)
    own = n0.membership.own
    own.start(link.now_ms, link.now().wall)
    assert n0.members.rec("n1").features & READS_RECORD_REFS
    assert items_to(n0, "n1") == (Alive(own.record),)
    # an update with a new certificate (re-enrolled member): whole
    again = make_node(link.auth, "n1", addresses=("10.0.0.2",), label="re-enrolled")
    inc = link.hosts["n1"].node.membership.own.incarnation + 1
    rec = MemberRecord("n1", inc, "10.0.0.2:7946", again.cert_bytes, False, READS_RECORD_REFS)
    data = encode_envelope(sign("member", encode_record(rec), [again.identity_seed]))
    link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (Alive(data),)))))
    assert n0.members.rec("n1").cert_bytes == again.cert_bytes
    assert Alive(data) in items_to(n0, "n2")


def test_our_refutation_and_leave_go_without_certificate():
    link = joined()
    n0 = link.hosts["n0"].node
    n0.membership.broadcasts.drop_known(lambda node_id, item: True)
    own = n0.membership.own
    own.refute(link.now_ms, own.incarnation)
    assert ref_of(own.record) in items_to(n0, "n1")
    own.leave(link.now_ms)
    assert ref_of(own.record) in items_to(n0, "n2")


def test_a_churned_cluster_converges_with_references():
    link = joined(6)
    link.hosts["n5"].node.membership.own.refute(link.now_ms, link.hosts["n5"].node.membership.own.incarnation)
    link.run_for(10_000)
    inc = link.hosts["n5"].node.membership.own.incarnation
    assert all(h.node.members.rec("n5").incarnation == inc for h in link.hosts.values())
    assert sum(h.node.membership.counters["record_refs_unknown_member"] +
               h.node.membership.counters["record_refs_other_cert"] for h in link.hosts.values()) == 0


# -- property: nothing but the member's own signed record is ever installed ----------------------------
_FIELDS = st.fixed_dictionaries({}, optional={
    "address": st.text(max_size=40), "left": st.booleans(), "features": st.integers(0, 7),
    "incarnation": st.integers(0, 1 << 62), "cert_ref": st.binary(min_size=16, max_size=16),
    "sig": st.binary(min_size=64, max_size=64),
})


@given(address=st.text(min_size=1, max_size=MAX_ADDRESS_CHARS), left=st.booleans(), bump=st.integers(1, 1 << 30),
       change=_FIELDS)
@settings(max_examples=80, deadline=None)
def test_property_a_reference_installs_exactly_the_signed_record_or_nothing(address, left, bump, change):
    """The member's record, altered anywhere on the way: either refused (raised: the relay's fault,
    or counted) or exactly the signed record is installed."""
    link = PROPERTY_LINK
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    before = n0.members.rec("n1")
    data = record(n1, before.incarnation + bump, address, left)
    item = msgspec.structs.replace(ref_of(data), **change)
    assert decode(encode(Ping(1, "n0", (item,)))).gossip == (item,)  # within the wire's bounds
    now = link.now()
    try:
        learned = n0.membership.records.learn_ref(item, now.ms, now.wall)
    except (SignatureError, FormatError, RemoteProtocolError):
        learned = False
    after = n0.members.rec("n1")
    assert learned == (after is not before)
    if learned:
        assert after.record == data and rebuild(item, before.cert_bytes, before.cert.identity_key) == data
        assert item == ref_of(data)


PROPERTY_LINK = joined()


def test_rec_names_its_certificate():
    link = PROPERTY_LINK
    rec = link.hosts["n0"].node.members.rec("n1")
    assert isinstance(rec, Rec) and rec.cert_ref == cert_ref(rec.cert_bytes) and len(rec.cert_ref) == CERT_REF_BYTES


def test_a_reference_signed_by_someone_else_is_blamed():
    """A record signed by another key than its member's, sent as a reference: blamed, not learned."""
    link = joined()
    n0, n1 = link.hosts["n0"].node, link.hosts["n1"].node
    rec = MemberRecord("n1", n1.membership.own.incarnation + 1, "10.6.6.6:1", n1.membership.own.cert_bytes,
                       False, READS_RECORD_REFS)
    data = encode_envelope(sign("member", encode_record(rec), [derive_seed("someone else")]))
    out = link.feed("n0", FrameReceived("n2", encode(Ping(1, "n0", (ref_of(data),)))))
    assert blamed(out, "n2") and n0.members.rec("n1").address == n1.advertise


# -- the measurement behind the README's bytes table (tests/bench_bytes.py) -----------------------------
@pytest.mark.simulation
def test_bytes_by_kind_add_up_to_the_report_and_churn_records_go_without_certificate():
    from tests.bench_bytes import ROWS, measure

    out = measure("internet", 100, 1)
    parts = [r for r in ROWS if not r.startswith("  ") and r != "total"]
    for window, rows in out["per_node"].items():
        assert abs(sum(rows[r] for r in parts) - rows["total"]) < 1.0, window
    last = out["versions"][-1]
    assert out["per_node"][f"version {last['serial']} B"]["total"] == pytest.approx(last["bytes_per_node"], abs=0.1)
    run = out["per_node"]["run B"]
    assert run["total"] == pytest.approx(out["report"]["run_bytes_per_node"], abs=0.1)
    assert run["member records on probes and acks"] > 0
    assert run["  records without certificate"] > 0.9 * run["member records on probes and acks"]
    assert out["counters_summed"]["record_refs_unknown_member"] + out["counters_summed"]["record_refs_other_cert"] == 0
    assert out["report"]["invariant_violations"] == 0


@given(st.lists(st.tuples(st.sampled_from(["add", "take"]), st.integers(0, 5), st.booleans(), st.integers(60, 1500)),
                max_size=120), st.integers(1, 6))
@settings(max_examples=150, deadline=None)
def test_property_the_queue_sends_each_record_at_most_limit_times_in_either_form(ops, limit):
    from protocol.gossip.broadcasts import BroadcastQueue

    queue = BroadcastQueue()
    whole = {k: Alive(bytes([k]) * 500) for k in range(6)}
    small = {k: AliveRef(f"n{k}", 1, "10.0.0.1:1", False, 1, bytes([k]) * CERT_REF_BYTES, b"\0" * 64) for k in range(6)}
    sent: dict[int, int] = {}
    has_compact: dict[int, bool] = {}
    for op, k, flag, budget in ops:
        if op == "add":  # a newer record about member k: its transmits start again
            queue.add(("m", f"n{k}"), whole[k], small[k] if flag else None)
            sent[k] = 0
            has_compact[k] = flag
            continue
        items = queue.take(budget, limit, refs=flag)
        assert sum(len(encode(x)) for x in items) <= budget
        for x in items:
            j = next(m for m in whole if x in (whole[m], small[m]))
            assert (x == small[j]) == (flag and has_compact[j])
            sent[j] += 1
            assert sent[j] <= limit
