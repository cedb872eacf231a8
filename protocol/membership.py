"""Membership: signed member records, SWIM failure detection with Lifeguard, directory digests.

* A member record (node_id, incarnation, address, certificate, left) is signed by the member's own
  Ed25519 identity key (``member`` envelope) and carries its authority-signed certificate.  Only the
  member can raise its incarnation, so only it can refute a suspicion or a death.
* SWIM: one probe at a time, round-robin over a shuffled ring; a direct ping, then ``indirect_probes``
  ping-reqs through other members, then suspicion.  Lifeguard: a local health multiplier (LHM) scales
  probe interval and timeouts and grows on failed probes and missing nacks; the suspicion timeout
  starts at ``max`` and shrinks towards ``min`` with independent confirmations; relays send nacks.
* Dead members are never forgotten: they stay in the directory (their certificates stay valid, so
  enforcement is unchanged) and are retried by the node.  Only an invalid, expired or revoked
  certificate removes a member.
* Anti-entropy digest: members are hashed into buckets by node id; a bucket's value is the XOR of
  per-member tokens over (node_id, incarnation, status seq), so a digest costs O(1) to maintain.
* Membership never calls back into the node: what it wants sent or reported goes to ``outbox`` (in
  order), which the node drains into its own effect list before adding anything of its own.

Memory layout: see ``protocol.members`` (about 40 bytes per member per node).

Peer-controlled memory.  Nothing from a peer is kept before it is verified: a status about a
non-member is counted and dropped, a record no newer than the one held is dropped unchecked.  A
member holds one record (<= MAX_RECORD_BYTES) and one status (<= MAX_STATUS_BYTES); a newer one
releases the older from the table and the ``VerifyCache``.  Suspicion sources, relayed probes and the
broadcast queue are capped per member / per requester and in bytes.  Incarnations never exceed
MAX_INCARNATION, and an unsigned claim about ours far beyond what we ever signed is refused.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from .broadcasts import MAX_BROADCAST_BYTES, MAX_BROADCASTS, BroadcastQueue
from .entropy import Entropy
from .errors import RemoteProtocolError, RevokedError, SignatureError, TrustError
from .gossip_config import GossipConfig
from .gossip_events import Alert, Disconnect, Effect, LivenessChanged, MemberEntry, Send
from .gossip_wire import (
    HASH_PREFIX,
    MAX_INCARNATION,
    MAX_RECORD_BYTES,
    MAX_STATUS_BYTES,
    Ack,
    Alive,
    Dead,
    GossipItem,
    MemberRecord,
    Nack,
    Ping,
    PingReq,
    Status,
    StatusBody,
    Suspect,
    decode_payload,
    encode,
)
from .members import (
    CACHE_ENTRY_BYTES,
    CACHE_MAX_BYTES,
    IndexedSet,
    IntSet,
    Member,
    MemberIndex,
    Rec,
    StatusInfo,
    VerifyCache,
    bucket_of,
)
from .metadata import Certificate
from .signing import Envelope, decode_envelope, encode_envelope, key_id, sign, signing_message, valid_signers
from .trust import TrustedState

__all__ = [  # the table's storage lives in protocol.members; these names stay importable from here
    "ALIVE", "CACHE_ENTRY_BYTES", "CACHE_MAX_BYTES", "DEAD", "LEFT", "LIVENESS", "MAX_BROADCASTS",
    "MAX_BROADCAST_BYTES", "MAX_RELAYS", "MAX_RELAYS_PER_PEER", "SUSPECT", "BroadcastQueue", "IndexedSet",
    "IntSet", "Member", "MemberIndex", "Membership", "Rec", "StatusInfo", "VerifyCache", "bucket_of",
]

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
LIVENESS = (ALIVE, SUSPECT, DEAD, LEFT)
_UNKNOWN, _ALIVE, _SUSPECT, _DEAD, _LEFT = range(5)
_NAME = ("", ALIVE, SUSPECT, DEAD, LEFT)
MAX_RELAYS = 256  # indirect probes relayed at once, in all
MAX_RELAYS_PER_PEER = 16  # ... and on behalf of one requester
_PIGGYBACK = (Ping, Ack, PingReq)  # the messages that carry gossip items
BUDDY_BYTES = 64  # an encoded Suspect item, with room to spare
_REC_OVERHEAD_BYTES = 1024  # a Rec's decoded certificate, slots and cache key beyond its byte strings
_STATUS_OVERHEAD_BYTES = 512  # a StatusInfo's decoded body, slots and cache key beyond its byte strings
# An unsigned claim about our own incarnation (a suspicion, a death, a peer's view of us) above ours is
# honest only when a record from our previous life carries it: incarnations start at the wall clock in
# ms, so one further than this above where we started is a lie.  A record signed with an incarnation
# this far ahead of the wall clock is refused the same way.
INCARNATION_SLACK = 1 << 40  # ms, about 35 years


@dataclass(slots=True)
class _Suspicion:
    sources: set[str]
    start_ms: int
    deadline_ms: int = 0


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started_ms: int
    direct_deadline_ms: int
    final_deadline_ms: int
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: str
    orig_seq: int
    nack_at_ms: int
    expire_ms: int
    nacked: bool = False


class Membership:
    def __init__(
        self,
        config: GossipConfig,
        trust: TrustedState,
        node_id: str,
        identity_seed: bytes,
        cert: Certificate,
        cert_bytes: bytes,
        advertise: str,
        rng: Entropy,
        cache: VerifyCache,
        connected: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.cfg = config
        self.trust = trust
        self.me = node_id
        self.region = cert.region
        self.cert = cert
        self.cert_bytes = cert_bytes
        self.advertise = advertise
        self._seed = identity_seed
        self.rng = rng
        self.cache = cache
        self.index = cache.index
        self.ids = self.index.ids  # member index -> node id (shared, append-only)
        self._me_i = self.index.intern(node_id)
        self.outbox: list[Effect] = []  # what we want sent or reported, in order (the node drains it)
        self.connected = connected
        self.preferred: IndexedSet | None = None  # peers with an open channel (set by the node)
        self.incarnation = 0
        self.record = b""
        self.status_seq = 0
        # columns, indexed by member index
        self._rec: list[Rec | None] = []
        self._st: list[StatusInfo | None] = []
        self._lv = bytearray()
        self.count = 0
        self._heard: dict[int, int] = {}  # recent frames only (pruned)
        self._heard_cap = 512
        self._susp: dict[int, _Suspicion] = {}
        self._watched: dict[str, int] = {}  # address -> member index advertising it (-1: nobody yet)
        self.alive: dict[str, IntSet] = {}  # region -> alive member indexes (self excluded)
        self.alive_all = IntSet()
        self.dead = IntSet()
        self.left = IntSet()
        nb = config.sync_buckets
        self._bucket_col, self._bucket_ids = self.index.buckets(nb)
        self._bucket_val = [0] * nb  # records: (node_id, incarnation)
        self._sbucket_val = [0] * nb  # status: (node_id, status seq)
        self._mhash: bytes | None = None
        self._shash: bytes | None = None
        self.broadcasts = BroadcastQueue()
        self.health = 0
        self._seq = 0
        self._probe: _Probe | None = None
        self._next_probe_ms = 0
        self._ring = array("i")
        self._ring_pos = 0
        self._relays: dict[int, _Relay] = {}
        self._relays_of: dict[str, int] = {}  # requester -> relays open on its behalf
        self.directory_dirty = True
        self.peers_dirty = True
        self._next_expiry = float("inf")  # earliest not_after in the table (kept by _install)
        self.counters: dict[str, int] = {
            "probes": 0, "probe_failures": 0, "suspicions": 0, "deaths_declared": 0, "refutations": 0,
            "records_rejected": 0, "absurd_incarnations": 0, "incarnation_saturated": 0,
            "status_unknown_member": 0, "relays_refused": 0,
        }
        self._claim_ceiling = INCARNATION_SLACK  # see refute (set again by start)
        self._root_key = b""
        self._refresh_root_key()

    # -- lookups -------------------------------------------------------------------------------------
    def _i(self, node_id: str) -> int | None:
        i = self.index.of.get(node_id)
        if i is None or i >= len(self._rec) or self._rec[i] is None:
            return None
        return i

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self._i(node_id) is not None

    def __len__(self) -> int:
        return self.count

    def rec(self, node_id: str) -> Rec | None:
        """The verified record this node holds for ``node_id`` (shared, immutable)."""
        i = self.index.of.get(node_id)
        return self._rec[i] if i is not None and i < len(self._rec) else None

    def liveness(self, node_id: str) -> str | None:
        i = self._i(node_id)
        return None if i is None else _NAME[self._lv[i]]

    def is_alive(self, node_id: str) -> bool:
        i = self.index.of.get(node_id)
        return i is not None and i < len(self._lv) and self._lv[i] == _ALIVE

    def status_of(self, node_id: str) -> StatusBody | None:
        i = self._i(node_id)
        st = self._st[i] if i is not None else None
        return st.body if st is not None else None

    def get(self, node_id: str) -> Member | None:
        """A snapshot of what we believe of ``node_id`` (None if it is not a member)."""
        i = self._i(node_id)
        if i is None:
            return None
        r = self._rec[i]
        assert r is not None
        st = self._st[i]
        return Member(r.node_id, r.region, r.address, r.incarnation, r.record, r.cert, r.cert_bytes,
                      _NAME[self._lv[i]], st.body if st else None, st.item if st else None,
                      self._heard.get(i, -(10**12)))

    def records(self) -> Iterator[Rec]:
        """Every member's record (ourselves included), in index order."""
        return (r for r in self._rec if r is not None)

    def id_at(self, i: int) -> str:
        return self.ids[i]

    def rec_at(self, i: int) -> Rec | None:
        return self._rec[i] if i < len(self._rec) else None

    def _grow(self, i: int) -> None:
        if i >= len(self._rec):
            k = max(i + 1, len(self.ids)) - len(self._rec)
            self._rec.extend([None] * k)
            self._st.extend([None] * k)
            self._lv.extend(bytes(k))

    # -- output --------------------------------------------------------------------------------------
    def outgoing(self, peer: str, msg: Any) -> Send:
        """The ``Send`` of ``msg`` to ``peer``.  Probes carry gossip items from the broadcast queue and
        the (root version, serial) of our policy.  Lifeguard's buddy system: a ping to a member we
        suspect carries that suspicion first, so the member hears of it (and refutes) even when the
        queue is crowded after a heal."""
        if isinstance(msg, _PIGGYBACK):
            buddy = self.buddy_item(peer) if isinstance(msg, Ping) else None
            budget = self.cfg.gossip_budget_bytes - (BUDDY_BYTES if buddy is not None else 0)
            items = self.broadcasts.take(budget, self.cfg.retransmit_limit(self.count)) \
                if len(self.broadcasts) else ()
            if buddy is not None:
                items = (buddy, *(x for x in items if not (isinstance(x, Suspect) and x.node_id == peer)))
            pol = self.trust.policy if isinstance(msg, (Ping, Ack)) else None
            root_v, serial = (pol.root_version, pol.serial) if pol is not None else (0, 0)
            if items or serial:
                msg = msgspec.structs.replace(msg, gossip=items, serial=serial, root_version=root_v) if serial \
                    else msgspec.structs.replace(msg, gossip=items)
        r = self.rec(peer)
        return Send(peer, r.address if r is not None else "", encode(msg))

    def _send(self, peer: str, msg: Any) -> None:
        self.outbox.append(self.outgoing(peer, msg))

    # -- identity ------------------------------------------------------------------------------------
    def _refresh_root_key(self) -> None:
        root = self.trust.root_bytes(self.trust.root_version) or b""
        self._root_key = hashlib.sha256(root).digest()[:16]

    def start(self, now_ms: int, wall: float) -> None:
        self.incarnation = min(max(1, int(wall * 1000)), MAX_INCARNATION)
        self._claim_ceiling = self.incarnation + INCARNATION_SLACK
        self.status_seq = self.incarnation
        self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record))
        self._next_probe_ms = now_ms + self.rng.below(self.cfg.probe_interval_ms)

    def _sign_record(self, now_ms: int, left: bool = False) -> None:
        rec = MemberRecord(self.me, self.incarnation, self.advertise, self.cert_bytes, left)
        self.record = encode_envelope(sign("member", encode(rec), [self._seed]))
        self._install(Rec(self._me_i, rec, self.cert, self.record), now_ms)

    def sign_status(self, serial: int, policy_hash: bytes, ruleset_hash: bytes, state: str, wall: float,
                    trusted: tuple[int, bytes] = (0, b""), equivocation: tuple[int, tuple[bytes, ...]] = (0, ())
                    ) -> Status:
        """``serial``/``policy_hash``/``ruleset_hash``: what the enforcer confirmed; ``trusted``:
        (serial, hash) the node verified; ``equivocation``: (serial, hashes) it saw signed twice."""
        self.status_seq = max(self.status_seq + 1, int(wall * 1000))
        body = StatusBody(self.me, self.status_seq, serial, policy_hash[:HASH_PREFIX], ruleset_hash[:HASH_PREFIX], state,
                          trusted[0], trusted[1][:HASH_PREFIX], equivocation[0],
                          tuple(h[:HASH_PREFIX] for h in equivocation[1][:4]))
        payload = encode(body)
        env = sign("member", payload, [self._seed])
        item = Status(payload, env.signatures[0].sig)
        info = StatusInfo(body, item)
        info.verified_key = self.cert.identity_key
        self._set_status(self._me_i, info)
        self.broadcasts.add(("s", self.me), item)  # first-hand, to the peers we talk to anyway
        return item

    def refute(self, now_ms: int, their_incarnation: int) -> None:
        """Answer an unsigned claim (a suspicion, a death, a peer's view) that we are at
        ``their_incarnation``: sign a record above it.  A claim above our incarnation and beyond
        anything a previous life of ours can have signed is a lie by the peer that sent it: it is
        counted, not adopted, and raised as a RemoteProtocolError (it costs that peer its channel)."""
        if their_incarnation > self.incarnation and their_incarnation > self._claim_ceiling:
            self.counters["absurd_incarnations"] += 1
            raise RemoteProtocolError(
                f"claim that {self.me} is at incarnation {their_incarnation}, far above its own {self.incarnation}")
        self._move_past(now_ms, their_incarnation)

    def _move_past(self, now_ms: int, incarnation: int) -> None:
        """Sign a record with an incarnation above ``incarnation`` (and ours), saturating at the
        largest one the wire carries: there, a further refutation is impossible and is counted."""
        nxt = min(max(self.incarnation, incarnation) + 1, MAX_INCARNATION)
        if nxt == self.incarnation:
            self.counters["incarnation_saturated"] += 1
        self.incarnation = nxt
        self.counters["refutations"] += 1
        self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record))

    def leave(self, now_ms: int) -> Alive:
        self.incarnation = min(self.incarnation + 1, MAX_INCARNATION)
        self._sign_record(now_ms, left=True)
        item = Alive(self.record)
        self.broadcasts.add(("m", self.me), item)
        return item

    @property
    def left_cluster(self) -> bool:
        return self._lv[self._me_i] == _LEFT if self._me_i < len(self._lv) else False

    # -- verification --------------------------------------------------------------------------------
    def verify_record(self, data: bytes, wall: float, key: tuple[bytes, bytes] | None = None) -> Rec:
        """Check a signed member record: its certificate (authority-signed, valid now, not revoked)
        and the member's own signature with the certificate's identity key."""
        if len(data) > MAX_RECORD_BYTES:
            raise RemoteProtocolError(f"member record of {len(data)} bytes exceeds the cap")
        if key is None:
            key = (bytes(data), self._root_key)
        hit = self.cache.get(key) or self.cache.weak_get(key)
        if not isinstance(hit, Rec):
            hit = self._verify_decoded(key, *self._decode_record(data), wall)
        self.check_cert_valid(hit.cert, wall)
        return hit

    @staticmethod
    def _decode_record(data: bytes) -> tuple[Envelope, MemberRecord]:
        env = decode_envelope(data, "member", MAX_RECORD_BYTES)
        rec = decode_payload(env.payload)
        if not isinstance(rec, MemberRecord):
            raise RemoteProtocolError("member envelope does not hold a member record")
        return env, rec

    def _verify_decoded(self, key: tuple[bytes, bytes], env: Envelope, rec: MemberRecord, wall: float) -> Rec:
        """The signature and certificate checks of ``verify_record``; only what passes is cached (one
        record per member: a newer one evicts the one it supersedes)."""
        if not 0 <= rec.incarnation <= int(wall * 1000) + INCARNATION_SLACK:
            self.counters["absurd_incarnations"] += 1
            raise RemoteProtocolError(f"member record of {rec.node_id} claims incarnation {rec.incarnation}")
        cert = self.trust.check_certificate(rec.cert)
        if cert.node_id != rec.node_id:
            raise SignatureError(f"member record for {rec.node_id} carries the certificate of {cert.node_id}")
        kid = key_id(cert.identity_key)
        if not valid_signers(env, {kid: cert.identity_key}, {kid}):
            raise SignatureError(f"member record of {rec.node_id} is not signed by its identity key")
        i = self.index.intern(rec.node_id)
        hit = Rec(i, rec, cert, key[0])
        nbytes = 2 * len(hit.record) + len(hit.cert_bytes) + _REC_OVERHEAD_BYTES  # record, cert, entry
        self.cache.put_member("r", i, rec.incarnation, key, hit, nbytes)
        return hit

    def check_cert_valid(self, cert: Certificate, wall: float) -> None:
        trust = self.trust
        skew = trust.skew_s
        if cert.not_before > wall + skew or cert.not_after < wall - skew:
            raise TrustError(f"certificate of {cert.node_id} ({cert.cert_id}) is outside its validity window")
        pol = trust.policy
        if pol is not None and (pol.revocations.nodes or pol.revocations.certs):
            trust.check_revoked(cert)

    @staticmethod
    def _verify_status(info: StatusInfo, identity_key: bytes) -> bool:
        if info.verified_key == identity_key:
            return True
        if info.rejected_key == identity_key:
            return False
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        try:
            VerifyKey(identity_key).verify(signing_message("member", info.item.payload), info.item.sig)
        except (BadSignatureError, ValueError, TypeError):
            info.rejected_key = identity_key
            return False
        info.verified_key = identity_key
        return True

    # -- table maintenance ---------------------------------------------------------------------------
    def _install(self, rec: Rec, now_ms: int) -> None:
        i = rec.idx
        if i >= len(self._rec):
            self._grow(i)
        old = self._rec[i]
        self._rec[i] = rec
        w = self._watched
        if w and (rec.address in w or (old is not None and old.address in w)):
            self._watch(old, rec)
        if old is None:
            self.count += 1
            self.directory_dirty = True
            self.peers_dirty = True
            if rec.left:
                self._set_liveness(i, _LEFT, now_ms, report=False)
            elif i == self._me_i:
                self._lv[i] = _ALIVE
            else:
                self._lv[i] = _ALIVE
                rs = self.alive.get(rec.region)
                if rs is None:
                    rs = self.alive[rec.region] = IntSet()
                rs.add(i)
                self.alive_all.add(i)
        else:
            if old.cert_bytes != rec.cert_bytes:
                self.directory_dirty = True
            if old.address != rec.address:
                self.peers_dirty = True
            if old.region != rec.region and i != self._me_i:
                moved = self.alive.get(old.region)
                if moved is not None and i in moved:
                    moved.discard(i)
                    self.alive.setdefault(rec.region, IntSet()).add(i)
            self._set_liveness(i, _LEFT if rec.left else _ALIVE, now_ms)
        if rec.cert.not_after < self._next_expiry:
            self._next_expiry = rec.cert.not_after
        b = self._bucket_col[i]
        self._bucket_val[b] ^= (old.token if old is not None else 0) ^ rec.token
        self._mhash = None

    def _set_status(self, i: int, info: StatusInfo) -> None:
        old = self._st[i]
        self._st[i] = info
        b = self._bucket_col[i]
        self._sbucket_val[b] ^= (old.token if old is not None else 0) ^ info.token
        self._shash = None

    def _set_liveness(self, i: int, code: int, now_ms: int, report: bool = True, source: str = "") -> None:
        old = self._lv[i]
        if i == self._me_i:
            self._lv[i] = _LEFT if code == _LEFT else _ALIVE
            return
        if old == code and report:
            return
        rec = self._rec[i]
        assert rec is not None
        self._lv[i] = code
        rs = self.alive.get(rec.region)
        if rs is None:
            rs = self.alive[rec.region] = IntSet()
        if code == _ALIVE:
            rs.add(i)
            self.alive_all.add(i)
        else:
            rs.discard(i)
            self.alive_all.discard(i)
        if code != _SUSPECT:
            self._susp.pop(i, None)
        (self.dead.add if code == _DEAD else self.dead.discard)(i)
        (self.left.add if code == _LEFT else self.left.discard)(i)
        if report and old != code:
            self.outbox.append(LivenessChanged(rec.node_id, _NAME[code], rec.incarnation, source))

    def remove(self, node_id: str, reason: str) -> None:
        i = self._i(node_id)
        if i is None or i == self._me_i:
            return
        rec = self._rec[i]
        assert rec is not None
        for s in (self.alive.get(rec.region), self.alive_all, self.dead, self.left):
            if s is not None:
                s.discard(i)
        self._susp.pop(i, None)
        self._heard.pop(i, None)
        b = self._bucket_col[i]
        self._bucket_val[b] ^= rec.token
        st = self._st[i]
        if st is not None:
            self._sbucket_val[b] ^= st.token
        self._rec[i] = None
        self._st[i] = None
        self._lv[i] = _UNKNOWN
        self.cache.forget_member(i)
        if rec.address in self._watched:
            self._watch(rec, None)
        self.count -= 1
        self._mhash = self._shash = None
        self.directory_dirty = True
        self.peers_dirty = True
        self.outbox.append(Disconnect(node_id, reason))
        self.outbox.append(Alert("membership.expelled", {"node": node_id, "reason": reason}))

    def expel_invalid(self, wall: float, revocations: bool = True) -> None:
        """Remove members whose certificate expired or is revoked by the current policy.  Without
        ``revocations`` (periodic housekeeping) the scan only runs once the earliest expiry is near."""
        if not revocations and wall + self.trust.skew_s < self._next_expiry:
            return
        self._next_expiry = float("inf")
        for rec in [r for r in self._rec if r is not None]:
            if rec.idx == self._me_i:
                continue
            self._next_expiry = min(self._next_expiry, rec.cert.not_after)
            try:
                self.check_cert_valid(rec.cert, wall)
            except RevokedError:
                self.remove(rec.node_id, "revoked")
            except TrustError:
                self.remove(rec.node_id, "certificate_invalid")

    def on_root_changed(self) -> None:
        self._refresh_root_key()

    # -- learning from gossip ------------------------------------------------------------------------
    def learn_record(self, data: bytes, now_ms: int, wall: float, rebroadcast: bool = True) -> bool:
        """Verify and merge one signed member record; True if it changed our view.  A record that is
        not newer than the one we hold changes nothing: it is dropped before any signature check."""
        if len(data) > MAX_RECORD_BYTES:
            raise RemoteProtocolError(f"member record of {len(data)} bytes exceeds the cap")
        key = (data, self._root_key)  # the exact bytes: a hit is the same record, checked before
        hit = self.cache.get(key) or self.cache.weak_get(key)
        if isinstance(hit, Rec):
            if hit.idx < len(self._rec):
                known = self._rec[hit.idx]
                if known is not None and known.incarnation >= hit.incarnation:
                    return False
            self.check_cert_valid(hit.cert, wall)
            rec = hit
        else:
            env, claim = self._decode_record(data)
            j = self.index.of.get(claim.node_id)
            if j is not None:
                held = self.incarnation if j == self._me_i else (
                    r.incarnation if j < len(self._rec) and (r := self._rec[j]) is not None else -1)
                if claim.incarnation <= held:
                    return False
            rec = self._verify_decoded(key, env, claim, wall)
            self.check_cert_valid(rec.cert, wall)
        i = rec.idx
        if i == self._me_i:
            if rec.incarnation > self.incarnation:  # a record from our previous life: move past it
                self._move_past(now_ms, rec.incarnation)
            return False
        if i >= len(self._rec):
            self._grow(i)
        known = self._rec[i]
        if known is not None and rec.incarnation <= known.incarnation:
            return False
        self._install(rec, now_ms)
        if rebroadcast and known is not None:
            # A refutation or a leave must travel fast; a join spreads by the joiner's own gossip and
            # by anti-entropy (re-broadcasting every join costs O(n) piggyback bytes per node).
            self.broadcasts.add(("m", rec.node_id), Alive(rec.record))
        return True

    def learn_status(self, item: Status) -> bool:
        """Verify and merge one member's signed status; True if it changed our view.  Nothing about a
        non-member, and nothing unverified, is kept: a status is checked against the identity key of
        the member's current record before it is cached or installed."""
        key = ("st", item.sig, item.payload)
        info = self.cache.get(key) or self.cache.weak_get(key)
        if isinstance(info, StatusInfo):
            body = info.body
        else:
            if len(item.payload) + len(item.sig) > MAX_STATUS_BYTES:
                raise RemoteProtocolError(f"status item of {len(item.payload) + len(item.sig)} bytes exceeds the cap")
            decoded = decode_payload(item.payload)
            if not isinstance(decoded, StatusBody):
                raise RemoteProtocolError("status item does not hold a status body")
            body, info = decoded, None
        i = self._i(body.node_id)
        if i is None:
            self.counters["status_unknown_member"] += 1
            return False
        if i == self._me_i:
            return False
        cur = self._st[i]
        if cur is not None and body.seq <= cur.body.seq:
            return False
        rec = self._rec[i]
        assert rec is not None
        if info is None:
            info = StatusInfo(body, item)
        if not self._verify_status(info, rec.cert.identity_key):
            raise SignatureError(f"status of {body.node_id} is not signed by its identity key")
        self.cache.put_member("s", i, body.seq, key, info, len(item.payload) + len(item.sig) + _STATUS_OVERHEAD_BYTES)
        self._set_status(i, info)
        return True

    def _rumour_target(self, item: Suspect | Dead, now_ms: int) -> tuple[int, Rec, int] | None:
        """(index, record, liveness) of the member a suspect/dead rumour is about, if it still
        applies: a rumour about ourselves is refuted here, a stale or moot one is dropped."""
        if item.node_id == self.me:
            if item.incarnation >= self.incarnation:
                self.refute(now_ms, item.incarnation)
            return None
        i = self._i(item.node_id)
        if i is None:
            return None
        rec = self._rec[i]
        assert rec is not None
        lv = self._lv[i]
        if item.incarnation < rec.incarnation or lv in (_DEAD, _LEFT):
            return None
        return i, rec, lv

    def on_suspect(self, item: Suspect, now_ms: int) -> None:
        target = self._rumour_target(item, now_ms)
        if target is None:
            return
        i, rec, lv = target
        if lv == _ALIVE:
            self._suspect(i, rec, item.source, now_ms)
            return
        s = self._susp.get(i)
        # only a member counts as an independent confirmation (and only k of them are kept)
        if s is not None and item.source not in s.sources and len(s.sources) <= self.cfg.suspicion_confirmations \
                and self._i(item.source) is not None:
            s.sources.add(item.source)
            self._reset_suspicion_deadline(s)
            self.broadcasts.add(("m", rec.node_id), Suspect(rec.node_id, rec.incarnation, item.source))

    def on_dead(self, item: Dead, now_ms: int) -> None:
        target = self._rumour_target(item, now_ms)
        if target is None:
            return
        i, rec, lv = target
        if now_ms - self._heard.get(i, -(10**12)) < self.cfg.probe_interval_ms * 3:
            # We heard from it a moment ago (a death declared across a healed partition, say):
            # suspect it instead, so that it gets the time to refute.
            if lv == _ALIVE:
                self._suspect(i, rec, item.source, now_ms)
            return
        self._set_liveness(i, _DEAD, now_ms, source=item.source)
        self.broadcasts.add(("m", rec.node_id), Dead(rec.node_id, rec.incarnation, item.source))

    def on_gossip(self, items: Iterable[GossipItem], now_ms: int, wall: float) -> None:
        for item in items:
            if isinstance(item, Alive):
                self.learn_record(item.record, now_ms, wall)
            elif isinstance(item, Suspect):
                self.on_suspect(item, now_ms)
            elif isinstance(item, Dead):
                self.on_dead(item, now_ms)
            else:
                self.learn_status(item)

    def heard_from(self, peer: str, now_ms: int) -> None:
        """A frame arrived from ``peer``: it is up right now (only its own refutation clears a
        suspicion in the cluster, but a fresh death claim about it is downgraded to a suspicion)."""
        i = self.index.of.get(peer)
        if i is not None:
            heard = self._heard
            heard[i] = now_ms
            if len(heard) > self._heard_cap:  # only the last few probe intervals matter (see on_dead)
                horizon = now_ms - 3 * self.cfg.probe_interval_ms
                self._heard = {k: v for k, v in heard.items() if v >= horizon}
                self._heard_cap = max(512, 2 * len(self._heard))  # amortised O(1) per frame

    # -- suspicion (Lifeguard) -----------------------------------------------------------------------
    def _suspect(self, i: int, rec: Rec, source: str, now_ms: int) -> None:
        """Start suspecting an alive member, and spread the suspicion."""
        self.counters["suspicions"] += 1
        s = self._susp[i] = _Suspicion({source}, now_ms)
        self._set_liveness(i, _SUSPECT, now_ms, source=source)
        self._reset_suspicion_deadline(s)
        self.broadcasts.add(("m", rec.node_id), Suspect(rec.node_id, rec.incarnation, source))

    def _reset_suspicion_deadline(self, s: _Suspicion) -> None:
        lo, hi = self.cfg.suspicion_bounds_ms(self.count)
        k = self.cfg.suspicion_confirmations
        confirmations = max(0, len(s.sources) - 1)
        if k <= 0:
            timeout = lo
        else:
            frac = math.log(confirmations + 1) / math.log(k + 1)
            timeout = max(lo, int(hi - (hi - lo) * frac))
        s.deadline_ms = s.start_ms + timeout

    # -- probing (SWIM) ------------------------------------------------------------------------------
    def _timeout_for(self, target: Rec | None) -> int:
        base = self.cfg.probe_timeout_ms
        if target is not None and target.region != self.region:
            base = self.cfg.cross_region_probe_timeout_ms
        dial = 0 if target is None or self.connected(target.node_id) else self.cfg.dial_allowance_ms
        return base * (1 + self.health) + dial

    def _next_target(self) -> Rec | None:
        lv = self._lv
        for _ in range(2):
            ring = self._ring
            while self._ring_pos < len(ring):
                i = ring[self._ring_pos]
                self._ring_pos += 1
                if i < len(lv) and lv[i] in (_ALIVE, _SUSPECT):
                    return self._rec[i]
            ring = array("i", self.alive_all.items)
            ring.extend(self._susp)
            self.rng.shuffle(ring)
            self._ring = ring
            self._ring_pos = 0
            if not ring:
                return None
        return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _health(self, delta: int) -> None:
        self.health = min(self.cfg.max_local_health, max(0, self.health + delta))

    def tick(self, now_ms: int) -> None:
        # suspicion timeouts
        if self._susp:
            for i in [i for i, s in self._susp.items() if s.deadline_ms <= now_ms]:
                rec = self._rec[i]
                assert rec is not None
                self.counters["deaths_declared"] += 1
                self._set_liveness(i, _DEAD, now_ms, source=self.me)
                self.broadcasts.add(("m", rec.node_id), Dead(rec.node_id, rec.incarnation, self.me))
        # relays: nack when the target stays silent
        if self._relays:
            for seq, r in list(self._relays.items()):
                if not r.nacked and now_ms >= r.nack_at_ms:
                    r.nacked = True
                    self._send(r.requester, Nack(r.orig_seq))
                if now_ms >= r.expire_ms:
                    self._drop_relay(seq)
        p = self._probe
        if p is not None:
            if not p.indirect_sent and now_ms >= p.direct_deadline_ms:
                self._send_indirect(p, now_ms)
            if now_ms >= p.final_deadline_ms:
                self._probe_failed(p, now_ms)
        if self._probe is None and now_ms >= self._next_probe_ms:
            self._start_probe(now_ms)

    def _start_probe(self, now_ms: int) -> None:
        interval = self.rng.jitter(self.cfg.probe_interval_ms * (1 + self.health), 0.05)
        self._next_probe_ms = now_ms + interval
        target = self._next_target()
        if target is None:
            return
        timeout = self._timeout_for(target)
        seq = self._next_seq()
        self._probe = _Probe(seq, target.node_id, now_ms, now_ms + timeout, now_ms + 3 * timeout)
        self.counters["probes"] += 1
        self._send(target.node_id, Ping(seq, target.node_id))

    def _send_indirect(self, p: _Probe, now_ms: int) -> None:
        p.indirect_sent = True
        target = self.rec(p.target)
        if target is None or self._i(p.target) is None:
            return
        ti = target.idx
        relays: list[int] = []
        pool = self.alive.get(target.region)
        want = self.cfg.indirect_probes
        for source in (pool, self.alive_all):
            if source is None or len(relays) >= want:
                continue
            for i in self.rng.sample(source.items, 2 * want):
                if i not in (ti, self._me_i) and i not in relays:
                    relays.append(i)
                if len(relays) >= want:
                    break
        p.expected_nacks = len(relays)
        for i in relays:
            self._send(self.ids[i], PingReq(p.seq, target.node_id, target.address))

    def _probe_failed(self, p: _Probe, now_ms: int) -> None:
        self._probe = None
        self.counters["probe_failures"] += 1
        missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self._health(max(missing, 0))
        i = self._i(p.target)
        if i is not None and self._lv[i] == _ALIVE:
            rec = self._rec[i]
            assert rec is not None
            self._suspect(i, rec, self.me, now_ms)

    def buddy_item(self, node_id: str) -> Suspect | None:
        """The suspicion we hold of ``node_id``, to piggyback on a ping to it (None if we hold none)."""
        i = self.index.of.get(node_id)
        if i is None or i >= len(self._lv) or self._lv[i] != _SUSPECT:
            return None
        rec = self._rec[i]
        assert rec is not None
        return Suspect(rec.node_id, rec.incarnation, self.me)

    def probe_send_failed(self, peer: str, now_ms: int) -> None:
        p = self._probe
        if p is not None and p.target == peer and not p.indirect_sent:
            p.direct_deadline_ms = now_ms

    def on_ping(self, peer: str, msg: Ping) -> None:
        if msg.target == self.me:
            self._send(peer, Ack(msg.seq))

    def on_ping_req(self, peer: str, msg: PingReq, now_ms: int) -> None:
        if msg.target == self.me:
            self._send(peer, Ack(msg.seq))
            return
        n = self._relays_of.get(peer, 0)
        if len(self._relays) >= MAX_RELAYS or n >= MAX_RELAYS_PER_PEER:
            self.counters["relays_refused"] += 1  # the requester's probe fails, as over a lossy link
            return
        target = self.rec(msg.target)
        seq = self._next_seq()
        timeout = self._timeout_for(target)
        self._relays[seq] = _Relay(peer, msg.seq, now_ms + timeout * 8 // 10, now_ms + 3 * timeout)
        self._relays_of[peer] = n + 1
        self._send(msg.target, Ping(seq, msg.target))

    def _drop_relay(self, seq: int) -> _Relay | None:
        r = self._relays.pop(seq, None)
        if r is not None:
            n = self._relays_of.pop(r.requester) - 1
            if n:
                self._relays_of[r.requester] = n
        return r

    def on_ack(self, msg: Ack, now_ms: int) -> None:
        p = self._probe
        if p is not None and msg.seq == p.seq:
            self._probe = None
            self._health(-1)
            return
        r = self._drop_relay(msg.seq)
        if r is not None:
            self._send(r.requester, Ack(r.orig_seq))

    def on_nack(self, msg: Nack) -> None:
        p = self._probe
        if p is not None and msg.seq == p.seq:
            p.nacks += 1

    def next_deadline(self) -> int:
        d = self._next_probe_ms if self._probe is None else min(
            self._probe.final_deadline_ms,
            self._probe.final_deadline_ms if self._probe.indirect_sent else self._probe.direct_deadline_ms,
        )
        for s in self._susp.values():
            d = min(d, s.deadline_ms)
        for r in self._relays.values():
            d = min(d, r.expire_ms if r.nacked else r.nack_at_ms)
        return d

    # -- selection -----------------------------------------------------------------------------------
    def pick(self, k: int, exclude: Callable[[str], bool], prefer: Callable[[str], bool] | None = None,
             cross: int = 1) -> list[str]:
        """Up to ``k`` alive peers: ``k - cross`` from our region, ``cross`` from others (falling back
        to whatever exists).  ``prefer`` (e.g. "has an open channel") wins ties among a few draws."""
        out: list[str] = []
        ids = self.ids
        local = self.alive.get(self.region)
        others = len(self.alive_all) - (len(local) if local else 0)
        n_cross = min(cross, k) if others > 0 else 0
        n_local = k - n_cross

        def draw(pool_choice: Callable[[], str | None], want: int) -> None:
            got = 0
            for _ in range(want * 6):
                if got >= want:
                    return
                best: str | None = None
                for _try in range(3):
                    cand = pool_choice()
                    if cand is None or cand in out or exclude(cand):
                        continue
                    best = cand
                    if prefer is None or prefer(cand):
                        break
                if best is not None:
                    out.append(best)
                    got += 1

        pref = self.preferred if prefer is not None else None
        if pref is not None and len(pref):
            # An open channel saves a dial (3 round trips, more under loss): draw from those first.
            def pref_choice(local_wanted: bool) -> str | None:
                nid = pref.choice(self.rng)
                r = self.rec(nid)
                if r is None or not self.is_alive(nid) or (r.region == self.region) != local_wanted:
                    return None
                return nid

            draw(lambda: pref_choice(True), n_local)
            if n_cross:
                draw(lambda: pref_choice(False), n_cross)
        have_local = sum(1 for x in out if (r := self.rec(x)) is not None and r.region == self.region)
        if local is not None and len(local) > 0 and have_local < n_local:
            draw(lambda: ids[local.choice(self.rng)], n_local - have_local)
        alive_all = self.alive_all
        if n_cross:
            def cross_choice() -> str | None:
                i = alive_all.choice(self.rng)
                r = self._rec[i]
                return ids[i] if r is not None and r.region != self.region else None
            draw(cross_choice, k - len(out))
        if len(out) < k and len(alive_all) > 0:
            draw(lambda: ids[alive_all.choice(self.rng)], k - len(out))
        return out

    # -- anti-entropy digest -------------------------------------------------------------------------
    def _summary(self, vals: list[int]) -> bytes:
        raw = b"".join(v.to_bytes(8, "big") for v in vals)
        return hashlib.blake2b(raw + self.count.to_bytes(4, "big"), digest_size=HASH_PREFIX).digest()

    def mhash(self) -> bytes:
        if self._mhash is None:
            self._mhash = self._summary(self._bucket_val)
        return self._mhash

    def shash(self) -> bytes:
        if self._shash is None:
            self._shash = self._summary(self._sbucket_val)
        return self._shash

    def bucket_hashes(self, status: bool = False) -> tuple[bytes, ...]:
        return tuple(v.to_bytes(8, "big") for v in (self._sbucket_val if status else self._bucket_val))

    def differing_buckets(self, theirs: tuple[bytes, ...], status: bool = False) -> list[int]:
        vals = self._sbucket_val if status else self._bucket_val
        if len(theirs) != len(vals):
            raise RemoteProtocolError(f"peer uses {len(theirs)} sync buckets, we use {len(vals)}")
        return [i for i, v in enumerate(vals) if v.to_bytes(8, "big") != theirs[i]]

    def entries(self, buckets: Iterable[int], status: bool = False) -> tuple[tuple[str, int], ...]:
        out: list[tuple[str, int]] = []
        recs = self._rec
        n = len(recs)
        nb = len(self._bucket_ids)
        for b in buckets:
            if 0 <= b < nb:
                ids = self._bucket_ids[b]
                if status:
                    sts = self._st
                    out += [(r.node_id, st.body.seq if (st := sts[i]) is not None else 0)
                            for i in ids if i < n and (r := recs[i]) is not None]
                else:
                    out += [(r.node_id, r.incarnation) for i in ids if i < n and (r := recs[i]) is not None]
        return tuple(out)

    def entry_batches(self, buckets: Iterable[int], status: bool, cap: int
                      ) -> Iterator[tuple[tuple[int, ...], tuple[tuple[str, int], ...]]]:
        """``entries`` of ``buckets`` grouped into messages of at most ``cap`` entries (whole buckets
        per message; a bucket larger than ``cap`` on its own is split)."""
        group: list[int] = []
        acc: list[tuple[str, int]] = []
        for b in buckets:
            mine = self.entries((b,), status)
            if group and len(acc) + len(mine) > cap:
                yield tuple(group), tuple(acc)
                group, acc = [], []
            if len(mine) > cap:
                for k in range(0, len(mine), cap):
                    yield (b,), mine[k:k + cap]
                continue
            group.append(b)
            acc += mine
        if group:
            yield tuple(group), tuple(acc)

    def compare_entries(self, buckets: Iterable[int], entries: Iterable[tuple[str, int]], status: bool
                        ) -> tuple[list[str], list[str]]:
        """Given a peer's entries for ``buckets``: (ids whose record/status we want, ids whose
        record/status they lack)."""
        theirs = dict(entries)
        theirs.pop(self.me, None)
        mine = dict(self.entries(buckets, status))
        get = mine.get
        if status:
            want = [nid for nid, v in theirs.items() if nid in mine and v > mine[nid]]
        else:
            want = [nid for nid, v in theirs.items() if v > get(nid, -1)]
        tget = theirs.get
        give = [nid for nid, v in mine.items() if v > tget(nid, -1)
                and (not status or self.status_item_of(nid) is not None)]
        return want, give

    def record_of(self, node_id: str) -> bytes | None:
        i = self.index.of.get(node_id)
        r = self._rec[i] if i is not None and i < len(self._rec) else None
        return r.record if r is not None else None

    def status_item_of(self, node_id: str) -> Status | None:
        i = self.index.of.get(node_id)
        st = self._st[i] if i is not None and i < len(self._st) else None
        return st.item if st is not None else None

    # -- views ---------------------------------------------------------------------------------------
    def view_of(self, node_id: str) -> tuple[int, str] | None:
        i = self._i(node_id)
        if i is None:
            return None
        r = self._rec[i]
        assert r is not None
        return r.incarnation, _NAME[self._lv[i]]

    def certs(self) -> tuple[dict[str, Certificate], int]:
        """Every member's certificate (ourselves included), and a digest of their exact bytes (a
        re-signed certificate with the same content is a change too)."""
        recs = [r for r in self._rec if r is not None]
        return {r.node_id: r.cert for r in recs}, sum(hash(r.cert_bytes) for r in recs)

    def watch_addresses(self, addresses: Iterable[str]) -> None:
        """Keep ``by_address`` O(1) for these addresses (the seeds, looked up on every retry)."""
        for a in addresses:
            self._watched.setdefault(a, -1)
        for r in self.records():
            if r.address in self._watched:
                self._watched[r.address] = r.idx

    def _watch(self, old: Rec | None, new: Rec | None) -> None:
        w = self._watched
        if old is not None and old.address in w and w[old.address] == old.idx and (new is None or new.address != old.address):
            w[old.address] = -1
        if new is not None and new.address in w:
            w[new.address] = new.idx

    def by_address(self, address: str) -> str | None:
        """The member (node id) advertising ``address``, if any."""
        i = self._watched.get(address)
        if i is not None:
            r = self._rec[i] if i >= 0 else None
            return r.node_id if r is not None and r.address == address else None
        for r in self.records():
            if r.address == address:
                return r.node_id
        return None

    def member_entries(self) -> list[MemberEntry]:
        """The member file's entries, ourselves excluded (built once per record)."""
        me = self._me_i
        return [r.entry for r in self._rec if r is not None and r.idx != me]
