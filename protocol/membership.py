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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgspec

from .entropy import Entropy
from .errors import RemoteProtocolError, RevokedError, SignatureError, TrustError
from .gossip_config import GossipConfig
from .gossip_events import Alert, Disconnect, Effect, LivenessChanged
from .gossip_wire import (
    HASH_PREFIX,
    MAX_RECORD_BYTES,
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
from .metadata import Certificate
from .signing import decode_envelope, encode_envelope, key_id, sign, signing_message, valid_signers
from .trust import TrustedState

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
LIVENESS = (ALIVE, SUSPECT, DEAD, LEFT)
MAX_BROADCASTS = 256


class VerifyCache:
    """Results of signature checks keyed by a hash of the exact bytes (and the root they were checked
    against).  One cache may be shared by many nodes in one process (the simulator does): a result
    depends only on the bytes and the trusted root, never on the node."""

    __slots__ = ("_d", "max_entries", "hits", "misses")

    def __init__(self, max_entries: int = 500_000) -> None:
        self._d: dict[object, object] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> object | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, key: object, value: object) -> None:
        if len(self._d) >= self.max_entries:
            self._d.clear()
        self._d[key] = value


class IndexedSet:
    """A set with O(1) add, discard and uniform random choice."""

    __slots__ = ("_items", "_index")

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, x: str) -> None:
        if x not in self._index:
            self._index[x] = len(self._items)
            self._items.append(x)

    def discard(self, x: str) -> None:
        i = self._index.pop(x, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def __contains__(self, x: object) -> bool:
        return x in self._index

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def choice(self, rng: Entropy) -> str:
        return self._items[rng.below(len(self._items))]


@dataclass(slots=True, eq=False)
class Member:
    node_id: str
    region: str
    address: str
    incarnation: int
    record: bytes
    cert: Certificate
    cert_bytes: bytes
    bucket: int
    liveness: str = ALIVE
    since_ms: int = 0
    status: StatusBody | None = None
    status_item: Status | None = None
    token: int = 0
    stoken: int = 0
    heard_ms: int = -(10**12)
    entry: bytes = b""  # pre-encoded {node_id, address, region, cert} for the persisted peer list
    suspect_sources: set[str] | frozenset[str] = frozenset()  # a real set only while suspect
    suspect_start_ms: int = 0
    suspect_deadline_ms: int = 0

    @property
    def status_seq(self) -> int:
        return self.status.seq if self.status else 0


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


class Port(Protocol):
    """What membership needs from the node façade."""

    def send(self, peer: str, msg: msgspec.Struct) -> None: ...

    def emit(self, effect: Effect) -> None: ...


def _token(node_id: str, version: int) -> int:
    h = hashlib.blake2b(f"{node_id}|{version}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


class BroadcastQueue:
    """Piggybacked gossip with a transmit limit (memberlist's TransmitLimitedQueue): a newer item about
    the same member replaces the older one; the least-transmitted items go first."""

    __slots__ = ("_items", "_order")

    def __init__(self) -> None:
        self._items: dict[object, list] = {}  # key -> [item, size, transmits, order]
        self._order = 0

    def add(self, key: object, item: GossipItem) -> None:
        self._order += 1
        self._items[key] = [item, len(encode(item)), 0, self._order]
        if len(self._items) > MAX_BROADCASTS:
            worst = max(self._items.items(), key=lambda kv: (kv[1][2], -kv[1][3]))[0]
            del self._items[worst]

    def __len__(self) -> int:
        return len(self._items)

    def take(self, budget: int, limit: int) -> tuple[GossipItem, ...]:
        if not self._items:
            return ()
        ranked = sorted(self._items.items(), key=lambda kv: (kv[1][2], -kv[1][3]))
        out: list[GossipItem] = []
        used = 0
        for key, entry in ranked:
            if used + entry[1] > budget:
                continue
            out.append(entry[0])
            used += entry[1]
            entry[2] += 1
            if entry[2] >= limit:
                del self._items[key]
            if used >= budget - 16:
                break
        return tuple(out)


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
        port: Port,
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
        self.port = port
        self.connected = connected
        self.preferred: IndexedSet | None = None  # peers with an open channel (set by the node)
        self.incarnation = 0
        self.record = b""
        self.status_seq = 0
        self.members: dict[str, Member] = {}
        self.alive: dict[str, IndexedSet] = {}  # region -> alive member ids (self excluded)
        self.alive_all = IndexedSet()
        self.suspects: dict[str, Member] = {}
        self.dead = IndexedSet()
        self.left = IndexedSet()
        self._bucket_val = [0] * config.sync_buckets  # records: (node_id, incarnation)
        self._sbucket_val = [0] * config.sync_buckets  # status: (node_id, status seq)
        self._bucket_ids: list[dict[str, None]] = [{} for _ in range(config.sync_buckets)]
        self._mhash: bytes | None = None
        self._shash: bytes | None = None
        self.broadcasts = BroadcastQueue()
        self.health = 0
        self._seq = 0
        self._probe: _Probe | None = None
        self._next_probe_ms = 0
        self._ring: list[str] = []
        self._ring_pos = 0
        self._relays: dict[int, _Relay] = {}
        self.directory_dirty = True
        self.peers_dirty = True
        self._next_expiry = float("-inf")
        self.counters: dict[str, int] = {
            "probes": 0, "probe_failures": 0, "suspicions": 0, "deaths_declared": 0, "refutations": 0,
            "records_rejected": 0,
        }
        self._root_key = b""
        self._refresh_root_key()

    # -- identity ------------------------------------------------------------------------------------
    def _refresh_root_key(self) -> None:
        root = self.trust.root_bytes(self.trust.root_version) or b""
        self._root_key = hashlib.sha256(root).digest()[:16]

    def start(self, now_ms: int, wall: float) -> None:
        self.incarnation = max(1, int(wall * 1000))
        self.status_seq = self.incarnation
        self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record))
        self._next_probe_ms = now_ms + self.rng.below(self.cfg.probe_interval_ms)

    def _sign_record(self, now_ms: int, left: bool = False) -> None:
        rec = MemberRecord(self.me, self.incarnation, self.advertise, self.cert_bytes, left)
        self.record = encode_envelope(sign("member", encode(rec), [self._seed]))
        self._install(rec, self.cert, self.record, now_ms)

    def sign_status(self, serial: int, policy_hash: bytes, ruleset_hash: bytes, state: str, wall: float) -> Status:
        self.status_seq = max(self.status_seq + 1, int(wall * 1000))
        body = StatusBody(self.me, self.status_seq, serial, policy_hash[:HASH_PREFIX], ruleset_hash[:HASH_PREFIX], state)
        payload = encode(body)
        env = sign("member", payload, [self._seed])
        item = Status(payload, env.signatures[0].sig)
        m = self.members[self.me]
        self._set_status(m, body, item)
        self.broadcasts.add(("s", self.me), item)  # first-hand, to the peers we talk to anyway
        return item

    def refute(self, now_ms: int, their_incarnation: int) -> None:
        self.incarnation = max(self.incarnation, their_incarnation) + 1
        self.counters["refutations"] += 1
        self._sign_record(now_ms)
        self.broadcasts.add(("m", self.me), Alive(self.record))

    def leave(self, now_ms: int) -> Alive:
        self.incarnation += 1
        self._sign_record(now_ms, left=True)
        item = Alive(self.record)
        self.broadcasts.add(("m", self.me), item)
        return item

    # -- verification --------------------------------------------------------------------------------
    def verify_record(self, data: bytes, wall: float, key: tuple[bytes, bytes] | None = None
                      ) -> tuple[MemberRecord, Certificate]:
        """Check a signed member record: its certificate (authority-signed, valid now, not revoked)
        and the member's own signature with the certificate's identity key."""
        if len(data) > MAX_RECORD_BYTES:
            raise RemoteProtocolError(f"member record of {len(data)} bytes exceeds the cap")
        if key is None:
            key = (hashlib.sha256(data).digest(), self._root_key)
        hit = self.cache.get(key)
        if hit is None:
            env = decode_envelope(data, "member", MAX_RECORD_BYTES)
            rec = decode_payload(env.payload)
            if not isinstance(rec, MemberRecord):
                raise RemoteProtocolError("member envelope does not hold a member record")
            cert = self.trust.check_certificate(rec.cert)
            if cert.node_id != rec.node_id:
                raise SignatureError(f"member record for {rec.node_id} carries the certificate of {cert.node_id}")
            kid = key_id(cert.identity_key)
            if not valid_signers(env, {kid: cert.identity_key}, {kid}):
                raise SignatureError(f"member record of {rec.node_id} is not signed by its identity key")
            hit = (rec, cert, bytes(data))
            self.cache.put(key, hit)
        rec2, cert2, _data = cast(tuple[MemberRecord, Certificate, bytes], hit)
        self.check_cert_valid(cert2, wall)
        return rec2, cert2

    def canonical(self, data: bytes) -> bytes:
        """The cached copy of verified record bytes (many views of one record share one object)."""
        hit = self.cache.get((hashlib.sha256(data).digest(), self._root_key))
        return cast(tuple[MemberRecord, Certificate, bytes], hit)[2] if hit is not None else data

    def check_cert_valid(self, cert: Certificate, wall: float) -> None:
        skew = self.trust.skew_s
        if cert.not_before > wall + skew or cert.not_after < wall - skew:
            raise TrustError(f"certificate of {cert.node_id} ({cert.cert_id}) is outside its validity window")
        self.trust.check_revoked(cert)

    def _verify_status(self, item: Status, m: Member) -> bool:
        key = (item.sig, m.cert.identity_key)
        hit = self.cache.get(key)
        if hit is None:
            from nacl.exceptions import BadSignatureError
            from nacl.signing import VerifyKey

            try:
                VerifyKey(m.cert.identity_key).verify(signing_message("member", item.payload), item.sig)
                hit = True
            except (BadSignatureError, ValueError, TypeError):
                hit = False
            self.cache.put(key, hit)
        return bool(hit)

    # -- table maintenance ---------------------------------------------------------------------------
    def _install(self, rec: MemberRecord, cert: Certificate, data: bytes, now_ms: int) -> Member:
        m = self.members.get(rec.node_id)
        if m is None:
            bucket = hashlib.blake2b(rec.node_id.encode(), digest_size=2).digest()[0] % self.cfg.sync_buckets
            m = Member(rec.node_id, cert.region, rec.address, rec.incarnation, data, cert, rec.cert, bucket,
                       since_ms=now_ms)
            self.members[rec.node_id] = m
            self._bucket_ids[bucket][rec.node_id] = None
            self.directory_dirty = True
            self.peers_dirty = True
            self._next_expiry = min(self._next_expiry, cert.not_after)
            if rec.left:
                self._set_liveness(m, LEFT, now_ms, report=False)
            elif rec.node_id != self.me:
                rs = self.alive.get(m.region)
                if rs is None:
                    rs = self.alive[m.region] = IndexedSet()
                rs.add(rec.node_id)
                self.alive_all.add(rec.node_id)
        else:
            if m.cert_bytes != rec.cert:
                self.directory_dirty = True
            if m.address != rec.address:
                self.peers_dirty = True
            if m.address != rec.address or m.cert_bytes != rec.cert:
                m.entry = b""
            m.incarnation, m.record, m.cert, m.cert_bytes, m.address = rec.incarnation, data, cert, rec.cert, rec.address
            m.region = cert.region
            self._set_liveness(m, LEFT if rec.left else ALIVE, now_ms)
        self._retoken(m)
        return m

    def _retoken(self, m: Member) -> None:
        new = _token(m.node_id, m.incarnation)
        self._bucket_val[m.bucket] ^= m.token ^ new
        m.token = new
        self._mhash = None

    def _set_status(self, m: Member, body: StatusBody, item: Status) -> None:
        m.status, m.status_item = body, item
        new = _token(m.node_id, body.seq)
        self._sbucket_val[m.bucket] ^= m.stoken ^ new
        m.stoken = new
        self._shash = None

    def _set_liveness(self, m: Member, liveness: str, now_ms: int, report: bool = True, source: str = "") -> None:
        old = m.liveness
        if m.node_id == self.me:
            m.liveness = LEFT if liveness == LEFT else ALIVE
            return
        if old == liveness and m.node_id in self.members and report:
            return
        m.liveness = liveness
        m.since_ms = now_ms
        rs = self.alive.setdefault(m.region, IndexedSet())
        if liveness == ALIVE:
            rs.add(m.node_id)
            self.alive_all.add(m.node_id)
        else:
            rs.discard(m.node_id)
            self.alive_all.discard(m.node_id)
        if liveness == SUSPECT:
            self.suspects[m.node_id] = m
        else:
            self.suspects.pop(m.node_id, None)
            m.suspect_sources = frozenset()
        (self.dead.add if liveness == DEAD else self.dead.discard)(m.node_id)
        (self.left.add if liveness == LEFT else self.left.discard)(m.node_id)
        if report and old != liveness:
            self.port.emit(LivenessChanged(m.node_id, liveness, m.incarnation, source))

    def remove(self, node_id: str, reason: str) -> None:
        m = self.members.pop(node_id, None)
        if m is None or node_id == self.me:
            return
        for s in (self.alive.get(m.region), self.alive_all, self.dead, self.left):
            if s is not None:
                s.discard(node_id)
        self.suspects.pop(node_id, None)
        self._bucket_ids[m.bucket].pop(node_id, None)
        self._bucket_val[m.bucket] ^= m.token
        self._sbucket_val[m.bucket] ^= m.stoken
        self._mhash = self._shash = None
        self.directory_dirty = True
        self.peers_dirty = True
        self.port.emit(Disconnect(node_id, reason))
        self.port.emit(Alert("membership.expelled", {"node": node_id, "reason": reason}))

    def expel_invalid(self, wall: float, revocations: bool = True) -> None:
        """Remove members whose certificate expired or is revoked by the current policy.  Without
        ``revocations`` (periodic housekeeping) the scan only runs once the earliest expiry is near."""
        if not revocations and wall + self.trust.skew_s < self._next_expiry:
            return
        self._next_expiry = float("inf")
        for m in list(self.members.values()):
            if m.node_id == self.me:
                continue
            self._next_expiry = min(self._next_expiry, m.cert.not_after)
            try:
                self.check_cert_valid(m.cert, wall)
            except RevokedError:
                self.remove(m.node_id, "revoked")
            except TrustError:
                self.remove(m.node_id, "certificate_invalid")

    def on_root_changed(self) -> None:
        self._refresh_root_key()

    # -- learning from gossip ------------------------------------------------------------------------
    def learn_record(self, data: bytes, now_ms: int, wall: float, rebroadcast: bool = True) -> bool:
        """Verify and merge one signed member record; True if it changed our view."""
        key = (hashlib.sha256(data).digest(), self._root_key)
        hit = self.cache.get(key) if len(data) <= MAX_RECORD_BYTES else None
        if hit is not None:
            known = self.members.get(hit[0].node_id)  # type: ignore[index]
            if known is not None and known.incarnation >= hit[0].incarnation:  # type: ignore[index]
                return False
        rec, cert = self.verify_record(data, wall, key)
        data = cast(tuple[MemberRecord, Certificate, bytes], self.cache.get(key) or (rec, cert, data))[2]
        if rec.node_id == self.me:
            if rec.incarnation > self.incarnation:  # a record from our previous life: move past it
                self.refute(now_ms, rec.incarnation)
            return False
        m = self.members.get(rec.node_id)
        if m is not None and rec.incarnation <= m.incarnation:
            return False
        self._install(rec, cert, data, now_ms)
        if rebroadcast and m is not None:
            # A refutation or a leave must travel fast; a join spreads by the joiner's own gossip and
            # by anti-entropy (re-broadcasting every join costs O(n) piggyback bytes per node).
            self.broadcasts.add(("m", rec.node_id), Alive(data))
        return True

    def learn_status(self, item: Status) -> bool:
        try:
            body = decode_payload(item.payload)
        except RemoteProtocolError:
            raise
        if not isinstance(body, StatusBody):
            raise RemoteProtocolError("status item does not hold a status body")
        m = self.members.get(body.node_id)
        if m is None or body.node_id == self.me or body.seq <= m.status_seq:
            return False
        if not self._verify_status(item, m):
            raise SignatureError(f"status of {body.node_id} is not signed by its identity key")
        self._set_status(m, body, item)
        return True

    def on_suspect(self, item: Suspect, now_ms: int) -> None:
        if item.node_id == self.me:
            if item.incarnation >= self.incarnation:
                self.refute(now_ms, item.incarnation)
            return
        m = self.members.get(item.node_id)
        if m is None or item.incarnation < m.incarnation or m.liveness in (DEAD, LEFT):
            return
        if m.liveness == ALIVE:
            self._suspect(m, item.source, now_ms)
            self.broadcasts.add(("m", m.node_id), Suspect(m.node_id, m.incarnation, item.source))
        elif item.source not in m.suspect_sources and len(m.suspect_sources) <= self.cfg.suspicion_confirmations:
            m.suspect_sources = {*m.suspect_sources, item.source}
            self._reset_suspicion_deadline(m)
            self.broadcasts.add(("m", m.node_id), Suspect(m.node_id, m.incarnation, item.source))

    def on_dead(self, item: Dead, now_ms: int) -> None:
        if item.node_id == self.me:
            if item.incarnation >= self.incarnation:
                self.refute(now_ms, item.incarnation)
            return
        m = self.members.get(item.node_id)
        if m is None or item.incarnation < m.incarnation or m.liveness in (DEAD, LEFT):
            return
        if now_ms - m.heard_ms < self.cfg.probe_interval_ms * 3:
            # We heard from it a moment ago (a death declared across a healed partition, say):
            # suspect it instead, so that it gets the time to refute.
            if m.liveness == ALIVE:
                self._suspect(m, item.source, now_ms)
                self.broadcasts.add(("m", m.node_id), Suspect(m.node_id, m.incarnation, item.source))
            return
        self._set_liveness(m, DEAD, now_ms, source=item.source)
        self.broadcasts.add(("m", m.node_id), Dead(m.node_id, m.incarnation, item.source))

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
        m = self.members.get(peer)
        if m is not None:
            m.heard_ms = now_ms

    # -- suspicion (Lifeguard) -----------------------------------------------------------------------
    def _suspect(self, m: Member, source: str, now_ms: int) -> None:
        self.counters["suspicions"] += 1
        m.suspect_sources = {source}
        m.suspect_start_ms = now_ms
        self._set_liveness(m, SUSPECT, now_ms, source=source)
        self._reset_suspicion_deadline(m)

    def _reset_suspicion_deadline(self, m: Member) -> None:
        lo, hi = self.cfg.suspicion_bounds_ms(len(self.members))
        k = self.cfg.suspicion_confirmations
        confirmations = max(0, len(m.suspect_sources) - 1)
        if k <= 0:
            timeout = lo
        else:
            import math

            frac = math.log(confirmations + 1) / math.log(k + 1)
            timeout = max(lo, int(hi - (hi - lo) * frac))
        m.suspect_deadline_ms = m.suspect_start_ms + timeout

    # -- probing (SWIM) ------------------------------------------------------------------------------
    def _timeout_for(self, target: Member | None) -> int:
        base = self.cfg.probe_timeout_ms
        if target is not None and target.region != self.region:
            base = self.cfg.cross_region_probe_timeout_ms
        dial = 0 if target is None or self.connected(target.node_id) else self.cfg.dial_allowance_ms
        return base * (1 + self.health) + dial

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._ring_pos < len(self._ring):
                nid = self._ring[self._ring_pos]
                self._ring_pos += 1
                m = self.members.get(nid)
                if m is not None and m.liveness in (ALIVE, SUSPECT):
                    return m
            self._ring = [nid for nid in self.alive_all] + list(self.suspects)
            self.rng.shuffle(self._ring)
            self._ring_pos = 0
            if not self._ring:
                return None
        return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _health(self, delta: int) -> None:
        self.health = min(self.cfg.max_local_health, max(0, self.health + delta))

    def tick(self, now_ms: int) -> None:
        # suspicion timeouts
        if self.suspects:
            for m in [m for m in self.suspects.values() if m.suspect_deadline_ms <= now_ms]:
                self.counters["deaths_declared"] += 1
                self._set_liveness(m, DEAD, now_ms, source=self.me)
                self.broadcasts.add(("m", m.node_id), Dead(m.node_id, m.incarnation, self.me))
        # relays: nack when the target stays silent
        if self._relays:
            for seq, r in list(self._relays.items()):
                if not r.nacked and now_ms >= r.nack_at_ms:
                    r.nacked = True
                    self.port.send(r.requester, Nack(r.orig_seq))
                if now_ms >= r.expire_ms:
                    del self._relays[seq]
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
        self.port.send(target.node_id, Ping(seq, target.node_id))

    def _send_indirect(self, p: _Probe, now_ms: int) -> None:
        p.indirect_sent = True
        target = self.members.get(p.target)
        if target is None:
            return
        relays: list[str] = []
        pool = self.alive.get(target.region)
        for source in (pool, self.alive_all):
            if source is None or len(relays) >= self.cfg.indirect_probes:
                continue
            for nid in self.rng.sample(list(source) if len(source) < 64 else source._items, 2 * self.cfg.indirect_probes):
                if nid not in (p.target, self.me) and nid not in relays:
                    relays.append(nid)
                if len(relays) >= self.cfg.indirect_probes:
                    break
        p.expected_nacks = len(relays)
        for nid in relays:
            self.port.send(nid, PingReq(p.seq, target.node_id, target.address))

    def _probe_failed(self, p: _Probe, now_ms: int) -> None:
        self._probe = None
        self.counters["probe_failures"] += 1
        missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self._health(max(missing, 0))
        m = self.members.get(p.target)
        if m is not None and m.liveness == ALIVE:
            self._suspect(m, self.me, now_ms)
            self.broadcasts.add(("m", m.node_id), Suspect(m.node_id, m.incarnation, self.me))

    def probe_send_failed(self, peer: str, now_ms: int) -> None:
        p = self._probe
        if p is not None and p.target == peer and not p.indirect_sent:
            p.direct_deadline_ms = now_ms

    def on_ping(self, peer: str, msg: Ping) -> None:
        if msg.target == self.me:
            self.port.send(peer, Ack(msg.seq))

    def on_ping_req(self, peer: str, msg: PingReq, now_ms: int) -> None:
        if msg.target == self.me:
            self.port.send(peer, Ack(msg.seq))
            return
        target = self.members.get(msg.target)
        seq = self._next_seq()
        timeout = self._timeout_for(target)
        self._relays[seq] = _Relay(peer, msg.seq, now_ms + timeout * 8 // 10, now_ms + 3 * timeout)
        self.port.send(msg.target, Ping(seq, msg.target))

    def on_ack(self, msg: Ack, now_ms: int) -> None:
        p = self._probe
        if p is not None and msg.seq == p.seq:
            self._probe = None
            self._health(-1)
            return
        r = self._relays.pop(msg.seq, None)
        if r is not None:
            self.port.send(r.requester, Ack(r.orig_seq))

    def on_nack(self, msg: Nack) -> None:
        p = self._probe
        if p is not None and msg.seq == p.seq:
            p.nacks += 1

    def next_deadline(self) -> int:
        d = self._next_probe_ms if self._probe is None else min(
            self._probe.final_deadline_ms,
            self._probe.final_deadline_ms if self._probe.indirect_sent else self._probe.direct_deadline_ms,
        )
        for m in self.suspects.values():
            d = min(d, m.suspect_deadline_ms)
        for r in self._relays.values():
            d = min(d, r.expire_ms if r.nacked else r.nack_at_ms)
        return d

    # -- selection -----------------------------------------------------------------------------------
    def pick(self, k: int, exclude: Callable[[str], bool], prefer: Callable[[str], bool] | None = None,
             cross: int = 1) -> list[str]:
        """Up to ``k`` alive peers: ``k - cross`` from our region, ``cross`` from others (falling back
        to whatever exists).  ``prefer`` (e.g. "has an open channel") wins ties among a few draws."""
        out: list[str] = []
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
            members = self.members

            def pref_choice(local_wanted: bool) -> str | None:
                nid = pref.choice(self.rng)
                m = members.get(nid)
                if m is None or m.liveness != ALIVE or (m.region == self.region) != local_wanted:
                    return None
                return nid

            draw(lambda: pref_choice(True), n_local)
            if n_cross:
                draw(lambda: pref_choice(False), n_cross)
        have_local = sum(1 for x in out if self.members[x].region == self.region)
        if local is not None and len(local) > 0 and have_local < n_local:
            draw(lambda: local.choice(self.rng), n_local - have_local)
        if n_cross:
            def cross_choice() -> str | None:
                nid = self.alive_all.choice(self.rng)
                return nid if self.members[nid].region != self.region else None
            draw(cross_choice, k - len(out))
        if len(out) < k and len(self.alive_all) > 0:
            draw(lambda: self.alive_all.choice(self.rng), k - len(out))
        return out

    # -- anti-entropy digest -------------------------------------------------------------------------
    def _summary(self, vals: list[int]) -> bytes:
        raw = b"".join(v.to_bytes(8, "big") for v in vals)
        return hashlib.blake2b(raw + len(self.members).to_bytes(4, "big"), digest_size=HASH_PREFIX).digest()

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

    def _version(self, m: Member, status: bool) -> int:
        if status:
            return m.status.seq if m.status is not None else 0
        return m.incarnation

    def entries(self, buckets: Iterable[int], status: bool = False) -> tuple[tuple[str, int], ...]:
        out: list[tuple[str, int]] = []
        members = self.members
        nb = len(self._bucket_ids)
        for b in buckets:
            if 0 <= b < nb:
                ids = self._bucket_ids[b]
                if status:
                    out += [(nid, st.seq if (st := members[nid].status) is not None else 0) for nid in ids]
                else:
                    out += [(nid, members[nid].incarnation) for nid in ids]
        return tuple(out)

    def compare_entries(self, buckets: Iterable[int], entries: Iterable[tuple[str, int]], status: bool
                        ) -> tuple[list[str], list[str]]:
        """Given a peer's entries for ``buckets``: (ids whose record/status we want, ids whose
        record/status they lack)."""
        members = self.members
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
                and (not status or members[nid].status_item is not None)]
        return want, give

    # -- views ---------------------------------------------------------------------------------------
    def view_of(self, node_id: str) -> tuple[int, str] | None:
        m = self.members.get(node_id)
        return None if m is None else (m.incarnation, m.liveness)

    def certs(self) -> dict[str, bytes]:
        return {nid: m.cert_bytes for nid, m in self.members.items()}

    def by_address(self, address: str) -> Member | None:
        for m in self.members.values():
            if m.address == address:
                return m
        return None

    def peers(self) -> list[dict[str, Any]]:
        return [{"node_id": m.node_id, "address": m.address, "region": m.region, "cert": m.cert_bytes}
                for m in self.members.values() if m.node_id != self.me]

    def peer_entries(self) -> list[bytes]:
        """Pre-encoded peer-list entries (one MessagePack map per member), built once per change."""
        out = []
        for m in self.members.values():
            if m.node_id == self.me:
                continue
            if not m.entry:
                key = (m.node_id, m.address, m.cert.cert_id)
                entry = self.cache.get(key)
                if entry is None:
                    entry = msgspec.msgpack.encode(
                        {"node_id": m.node_id, "address": m.address, "region": m.region, "cert": m.cert_bytes})
                    self.cache.put(key, entry)
                m.entry = cast(bytes, entry)
            out.append(m.entry)
        return out
