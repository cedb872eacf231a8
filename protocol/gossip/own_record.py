"""This node's own member record and status: signing them, and refuting claims about itself.

A member record (node_id, incarnation, address, certificate, left, features) is signed by the
member's own Ed25519 identity key (``member`` envelope) and carries its authority-signed certificate.
Our start record travels whole; our refutations and our leave also as ``AliveRef`` (without the
certificate, to members that read it: see ``protocol.gossip.record_refs``).  Only the
member can raise its incarnation, so only it can refute a suspicion or a death: it signs a record
above the claimed incarnation and queues it as gossip.  Incarnations start at the wall clock in ms and
never exceed MAX_INCARNATION; an unsigned claim about ours far beyond what we ever signed is refused.
"""

from __future__ import annotations

from protocol.errors import RemoteProtocolError
from protocol.gossip.broadcasts import BroadcastQueue
from protocol.gossip.member_table import LEFT_CODE, MemberTable
from protocol.gossip.members import Rec, StatusInfo
from protocol.gossip.record_refs import compact
from protocol.gossip.wire import (
    HASH_PREFIX,
    MAX_INCARNATION,
    READS_RECORD_REFS,
    Alive,
    MemberRecord,
    ProbeReport,
    Status,
    StatusBody,
    encode_record,
    encode_status,
)
from protocol.trust.metadata import Certificate
from protocol.trust.signing import encode_envelope, sign

# An unsigned claim about our own incarnation (a suspicion, a death, a peer's view of us) above ours is
# honest only when a record from our previous life carries it: incarnations start at the wall clock in
# ms, so one further than this above where we started is a lie.  A record signed with an incarnation
# this far ahead of the wall clock is refused the same way.
INCARNATION_SLACK = 1 << 40  # ms, about 35 years
FEATURES = READS_RECORD_REFS  # what this release reads, listed in our record


class OwnRecord:
    def __init__(self, table: MemberTable, broadcasts: BroadcastQueue, identity_seed: bytes, cert: Certificate,
                 cert_bytes: bytes, advertise: str, counters: dict[str, int]) -> None:
        self.table = table
        self.broadcasts = broadcasts
        self.me = table.me
        self.identity_seed = identity_seed
        self.cert = cert
        self.cert_bytes = cert_bytes
        self.advertise = advertise
        self.counters = counters
        self.incarnation = 0
        self.record = b""  # our signed member record (exact bytes)
        self.status_seq = 0
        self.claim_ceiling = INCARNATION_SLACK  # see refute (set again by start)

    def start(self, now_ms: int, wall: float) -> None:
        self.incarnation = min(max(1, int(wall * 1000)), MAX_INCARNATION)
        self.claim_ceiling = self.incarnation + INCARNATION_SLACK
        self.status_seq = self.incarnation
        self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record))

    def _sign_record(self, now_ms: int, left: bool = False) -> Rec:
        rec = MemberRecord(self.me, self.incarnation, self.advertise, self.cert_bytes, left, FEATURES)
        self.record = encode_envelope(sign("member", encode_record(rec), [self.identity_seed]))
        signed = Rec(self.table.me_index, rec, self.cert, self.record)
        self.table.install(signed, now_ms)
        return signed

    def sign_status(self, serial: int, policy_hash: bytes, ruleset_hash: bytes, state: str, wall: float,
                    trusted: tuple[int, bytes] = (0, b""), equivocation: tuple[int, tuple[bytes, ...]] = (0, ()),
                    validations: tuple[ProbeReport, ...] = (), alerts_open: tuple[int, ...] = ()) -> Status:
        """``serial``/``policy_hash``/``ruleset_hash``: what the enforcer confirmed; ``trusted``:
        (serial, hash) the node verified; ``equivocation``: (serial, hashes) it saw signed twice;
        ``validations`` / ``alerts_open``: the shell's validation summary (see ``StatusBody``)."""
        self.status_seq = max(self.status_seq + 1, int(wall * 1000))
        body = StatusBody(self.me, self.status_seq, serial, policy_hash[:HASH_PREFIX], ruleset_hash[:HASH_PREFIX], state,
                          trusted[0], trusted[1][:HASH_PREFIX], equivocation[0],
                          tuple(h[:HASH_PREFIX] for h in equivocation[1][:4]), validations, alerts_open)
        payload = encode_status(body)
        env = sign("member", payload, [self.identity_seed])
        item = Status(payload, env.signatures[0].sig)
        info = StatusInfo(body, item)
        info.verified_key = self.cert.identity_key
        self.table.set_status(self.table.me_index, info)
        self.broadcasts.add(("s", self.me), item)  # first-hand, to the peers we talk to anyway
        return item

    def refute(self, now_ms: int, their_incarnation: int) -> None:
        """Answer an unsigned claim (a suspicion, a death, a peer's view) that we are at
        ``their_incarnation``: sign a record above it.  A claim above our incarnation and beyond
        anything a previous life of ours can have signed is a lie by the peer that sent it: it is
        counted, not adopted, and raised as a RemoteProtocolError (it costs that peer its channel)."""
        if their_incarnation > self.incarnation and their_incarnation > self.claim_ceiling:
            self.counters["absurd_incarnations"] += 1
            raise RemoteProtocolError(
                f"claim that {self.me} is at incarnation {their_incarnation}, far above its own {self.incarnation}")
        self.move_past(now_ms, their_incarnation)

    def move_past(self, now_ms: int, incarnation: int) -> None:
        """Sign a record with an incarnation above ``incarnation`` (and ours), saturating at the
        largest one the wire carries: there, a further refutation is impossible and is counted."""
        nxt = min(max(self.incarnation, incarnation) + 1, MAX_INCARNATION)
        if nxt == self.incarnation:
            self.counters["incarnation_saturated"] += 1
        self.incarnation = nxt
        self.counters["refutations"] += 1
        signed = self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record), compact(signed))

    def leave(self, now_ms: int) -> Alive:
        self.incarnation = min(self.incarnation + 1, MAX_INCARNATION)
        signed = self._sign_record(now_ms, left=True)
        item = Alive(self.record)
        self.broadcasts.add(("m", self.me), item, compact(signed))
        return item

    @property
    def left_cluster(self) -> bool:
        codes, i = self.table.liveness_codes, self.table.me_index
        return codes[i] == LEFT_CODE if i < len(codes) else False
