"""Verifying and merging what peers say about members: signed records, signed statuses, certificates.

Nothing from a peer is kept before it is verified: a status about a non-member is counted and dropped,
a record no newer than the one held is dropped unchecked.  A record without its certificate
(``AliveRef``) is rebuilt around the certificate held for its member and verified like a full one
(``learn_ref``; see ``protocol.gossip.record_refs``).  A member holds one record
(<= MAX_RECORD_BYTES) and one status (<= MAX_STATUS_BYTES); a newer one releases the older from the
table and the ``VerifyCache``.  Only verified results enter the cache, keyed by the exact bytes and the
trusted root they were checked against.
"""

from __future__ import annotations

import hashlib

from protocol.errors import FormatError, RemoteProtocolError, RevokedError, SignatureError, TrustError
from protocol.gossip.broadcasts import BroadcastQueue
from protocol.gossip.member_table import MemberTable
from protocol.gossip.members import Rec, StatusInfo, VerifyCache
from protocol.gossip.own_record import INCARNATION_SLACK, OwnRecord
from protocol.gossip.record_refs import rebuild, relay_forms
from protocol.gossip.wire import (
    MAX_RECORD_BYTES,
    MAX_STATUS_BYTES,
    AliveRef,
    MemberRecord,
    Status,
    StatusBody,
    decode_payload,
)
from protocol.trust.metadata import Certificate
from protocol.trust.signing import Envelope, decode_envelope, key_id, signing_message, valid_signers
from protocol.trust.state import TrustedState

REC_OVERHEAD_BYTES = 1024  # a Rec's decoded certificate, slots and cache key beyond its byte strings
STATUS_OVERHEAD_BYTES = 512  # a StatusInfo's decoded body, slots and cache key beyond its byte strings


def check_cert_valid(trust: TrustedState, cert: Certificate, wall: float) -> None:
    """A certificate already verified against the root: within its validity window and not revoked."""
    skew = trust.skew_s
    if cert.not_before > wall + skew or cert.not_after < wall - skew:
        raise TrustError(f"certificate of {cert.node_id} ({cert.cert_id}) is outside its validity window")
    pol = trust.policy
    if pol is not None and (pol.revocations.nodes or pol.revocations.certs):
        trust.check_revoked(cert)


def _decode_record(data: bytes) -> tuple[Envelope, MemberRecord]:
    env = decode_envelope(data, "member", MAX_RECORD_BYTES)
    rec = decode_payload(env.payload)
    if not isinstance(rec, MemberRecord):
        raise RemoteProtocolError("member envelope does not hold a member record")
    return env, rec


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


class MemberRecords:
    def __init__(self, trust: TrustedState, cache: VerifyCache, table: MemberTable, own: OwnRecord,
                 broadcasts: BroadcastQueue, counters: dict[str, int]) -> None:
        self.trust = trust
        self.cache = cache
        self.table = table
        self.own = own
        self.broadcasts = broadcasts
        self.counters = counters
        self._root_key = b""
        self.on_root_changed()

    def on_root_changed(self) -> None:
        """Cached verifications name the root they were checked against."""
        root = self.trust.root_bytes(self.trust.root_version) or b""
        self._root_key = hashlib.sha256(root).digest()[:16]

    def check_cert_valid(self, cert: Certificate, wall: float) -> None:
        check_cert_valid(self.trust, cert, wall)

    # -- records -------------------------------------------------------------------------------------
    def verify_record(self, data: bytes, wall: float, key: tuple[bytes, bytes] | None = None) -> Rec:
        """Check a signed member record: its certificate (authority-signed, valid now, not revoked)
        and the member's own signature with the certificate's identity key."""
        if len(data) > MAX_RECORD_BYTES:
            raise RemoteProtocolError(f"member record of {len(data)} bytes exceeds the cap")
        if key is None:
            key = (bytes(data), self._root_key)
        hit = self.cache.get(key) or self.cache.weak_get(key)
        if not isinstance(hit, Rec):
            hit = self._verify_decoded(key, *_decode_record(data), wall)
        self.check_cert_valid(hit.cert, wall)
        return hit

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
        i = self.table.index.intern(rec.node_id)
        hit = Rec(i, rec, cert, key[0])
        nbytes = 2 * len(hit.record) + len(hit.cert_bytes) + REC_OVERHEAD_BYTES  # record, cert, entry
        self.cache.put_member("r", i, rec.incarnation, key, hit, nbytes)
        return hit

    def learn_record(self, data: bytes, now_ms: int, wall: float, rebroadcast: bool = True) -> bool:
        """Verify and merge one signed member record; True if it changed our view.  A record that is
        not newer than the one we hold changes nothing: it is dropped before any signature check."""
        if len(data) > MAX_RECORD_BYTES:
            raise RemoteProtocolError(f"member record of {len(data)} bytes exceeds the cap")
        table = self.table
        recs = table.recs
        key = (data, self._root_key)  # the exact bytes: a hit is the same record, checked before
        hit = self.cache.get(key) or self.cache.weak_get(key)
        if isinstance(hit, Rec):
            if hit.idx < len(recs):
                known = recs[hit.idx]
                if known is not None and known.incarnation >= hit.incarnation:
                    return False
            self.check_cert_valid(hit.cert, wall)
            rec = hit
        else:
            env, claim = _decode_record(data)
            j = table.index.of.get(claim.node_id)
            if j is not None:
                held = self.own.incarnation if j == table.me_index else (
                    r.incarnation if j < len(recs) and (r := recs[j]) is not None else -1)
                if claim.incarnation <= held:
                    return False
            rec = self._verify_decoded(key, env, claim, wall)
            self.check_cert_valid(rec.cert, wall)
        i = rec.idx
        if i == table.me_index:
            if rec.incarnation > self.own.incarnation:  # a record from our previous life: move past it
                self.own.move_past(now_ms, rec.incarnation)
            return False
        if i >= len(table.recs):
            table.grow(i)
        known = table.recs[i]
        if known is not None and rec.incarnation <= known.incarnation:
            return False
        table.install(rec, now_ms)
        if rebroadcast and known is not None:
            # A refutation or a leave must travel fast; a join spreads by the joiner's own gossip and
            # by anti-entropy (re-broadcasting every join costs O(n) piggyback bytes per node).  With
            # the certificate unchanged, members that read references get it without the certificate.
            qkey, item, size, ref, ref_size = relay_forms(rec)
            same_cert = known.cert_bytes == rec.cert_bytes
            self.broadcasts.add_sized(qkey, item, size, ref if same_cert else None, ref_size)
        return True

    def learn_ref(self, item: AliveRef, now_ms: int, wall: float) -> bool:
        """A record relayed without its certificate: rebuilt around the certificate of the record held
        for its member and learned as a relayed record (verified the same way; a forged one is the
        peer's fault).  Not newer than the record held: dropped unchecked.  No record of the member, or
        one with another certificate: refused and counted (not the peer's fault: anti-entropy or a
        later full copy brings it)."""
        held = self.table.rec(item.node_id)
        if held is None:
            self.counters["record_refs_unknown_member"] += 1
            return False
        mine = held.idx == self.table.me_index
        if item.incarnation <= (self.own.incarnation if mine else held.incarnation):
            return False
        if item.cert_ref != held.cert_ref:
            self.counters["record_refs_other_cert"] += 1
            return False
        data = rebuild(item, held.cert_bytes, held.cert.identity_key)
        learned = self.learn_relayed_record(data, now_ms, wall)
        self.counters["record_refs_learned"] += learned
        return learned

    # -- statuses ------------------------------------------------------------------------------------
    def learn_status(self, item: Status) -> bool:
        """Verify and merge one member's signed status; True if it changed our view.  Nothing about a
        non-member, and nothing unverified, is kept: a status is checked against the identity key of
        the member's current record before it is cached or installed."""
        key = ("st", item.sig, item.payload)
        info = self.cache.get(key)
        held = info is not None  # held by the cache: the latest it verified for this member (see put_member)
        if info is None:
            info = self.cache.weak_get(key)
        if isinstance(info, StatusInfo):
            body = info.body
        else:
            held = False
            if len(item.payload) + len(item.sig) > MAX_STATUS_BYTES:
                raise RemoteProtocolError(f"status item of {len(item.payload) + len(item.sig)} bytes exceeds the cap")
            decoded = decode_payload(item.payload)
            if not isinstance(decoded, StatusBody):
                raise RemoteProtocolError("status item does not hold a status body")
            body, info = decoded, None
        table = self.table
        i = table.index_of(body.node_id)
        if i is None:
            self.counters["status_unknown_member"] += 1
            return False
        if i == table.me_index:
            return False
        cur = table.statuses[i]
        if cur is not None and body.seq <= cur.body.seq:
            return False
        rec = table.recs[i]
        assert rec is not None
        if info is None:
            info = StatusInfo(body, item)
        if not _verify_status(info, rec.cert.identity_key):
            raise SignatureError(f"status of {body.node_id} is not signed by its identity key")
        if not held:
            self.cache.put_member("s", i, body.seq, key, info,
                                  len(item.payload) + len(item.sig) + STATUS_OVERHEAD_BYTES)
        table.set_status(i, info)
        return True

    # -- validity ------------------------------------------------------------------------------------
    def expel_invalid(self, wall: float, revocations: bool = True) -> None:
        """Remove members whose certificate expired or is revoked by the current policy.  Without
        ``revocations`` (periodic housekeeping) the scan only runs once the earliest expiry is near."""
        table = self.table
        if not revocations and wall + self.trust.skew_s < table.next_expiry:
            return
        table.next_expiry = float("inf")
        for rec in [r for r in table.recs if r is not None]:
            if rec.idx == table.me_index:
                continue
            table.next_expiry = min(table.next_expiry, rec.cert.not_after)
            try:
                self.check_cert_valid(rec.cert, wall)
            except RevokedError:
                table.remove(rec.node_id, "revoked")
            except TrustError:
                table.remove(rec.node_id, "certificate_invalid")

    def learn_relayed_record(self, data: bytes, now_ms: int, wall: float, rebroadcast: bool = True) -> bool:
        """``learn_record`` of a record a peer relayed: a forged or malformed one is the peer's fault
        (raised); an expired or revoked one was relayed in good faith, just not for us (counted)."""
        try:
            return self.learn_record(data, now_ms, wall, rebroadcast)
        except (SignatureError, FormatError):
            raise
        except TrustError:
            self.counters["records_rejected"] += 1
            return False
