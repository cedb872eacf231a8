"""The member table: what this node believes of every member, in columns indexed by member index.

Per member it holds the verified record (``Rec``), the verified status (``StatusInfo``), a liveness
byte, the suspicion under way (if any) and when we last heard from it; per region the set of alive
members.  Two small parts ride along, told of every install and removal: the anti-entropy digest
(``protocol.gossip.sync_digest``: bucket values, so a directory digest costs O(1) to maintain) and
the watch of the seeds' addresses (``protocol.gossip.address_watch``).  What enforcement and the
member file get from the table is built in ``protocol.gossip.directory``.  The storage types
(``Rec``, ``IntSet``, the shared ``VerifyCache`` and ``MemberIndex``) live in ``protocol.gossip.members``.

The table verifies nothing (``protocol.gossip.member_records`` does, before anything is installed) and
decides nothing: it installs, reports liveness changes (``LivenessChanged``) and expulsions
(``Disconnect``, ``Alert``) to ``outbox`` in order, and answers lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter

from protocol.errors import LocalProtocolError
from protocol.gossip.address_watch import AddressWatch
from protocol.gossip.events import Alert, Disconnect, Effect, LivenessChanged
from protocol.gossip.member_base import (
    ConvergedDirectory,
    OverlayColumn,
    OverlayIntSet,
)
from protocol.gossip.members import IntSet, Member, Rec, StatusInfo, VerifyCache
from protocol.gossip.sync_digest import SyncDigest
from protocol.gossip.wire import Status, StatusBody, Suspect

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
LIVENESS = (ALIVE, SUSPECT, DEAD, LEFT)
UNKNOWN_CODE, ALIVE_CODE, SUSPECT_CODE, DEAD_CODE, LEFT_CODE = range(5)  # the liveness column's bytes
LIVENESS_NAME = ("", ALIVE, SUSPECT, DEAD, LEFT)  # by code
NEVER_HEARD_MS = -(10**12)
_cert_item, _entry = attrgetter("cert_item"), attrgetter("entry")


@dataclass(slots=True)
class Suspicion:
    """A suspicion under way: who confirmed it, since when, and when it turns into a death."""

    sources: set[str]
    start_ms: int
    deadline_ms: int = 0


class MemberTable:
    def __init__(self, node_id: str, region: str, cache: VerifyCache, sync_buckets: int, outbox: list[Effect]
                 ) -> None:
        self.me = node_id
        self.region = region
        self.cache = cache
        self.index = cache.index
        self.ids = self.index.ids  # member index -> node id (shared, append-only)
        self.me_index = self.index.intern(node_id)
        self.outbox = outbox
        # columns, indexed by member index
        self.recs: list[Rec | None] = []
        self.statuses: list[StatusInfo | None] = []
        self.liveness_codes = bytearray()
        self.count = 0
        self.heard_ms: dict[int, int] = {}  # recent frames only (pruned)
        self._heard_cap = 512
        self.suspicions: dict[int, Suspicion] = {}
        self.addresses = AddressWatch()  # the seeds' addresses, looked up on every retry
        self.alive: dict[str, IntSet] = {}  # region -> alive member indexes (self excluded)
        self.alive_all = IntSet()
        self.dead = IntSet()
        self.left = IntSet()
        self.alive_version = 0  # bumped whenever the alive sets may have changed (memo key, see broadcast_tree)
        self.tree_memo: tuple[int, int, tuple[str, ...], tuple[str, ...]] | None = None  # broadcast_tree's
        self.digest = SyncDigest(self.index, sync_buckets)  # the anti-entropy digest of what is held
        self.directory_dirty = True
        self.peers_dirty = True
        self.next_expiry = float("inf")  # earliest not_after in the table (kept by install)
        self.cert_fingerprint = 0  # sum of the held records' cert_hash (kept by install and remove)
        self.base: ConvergedDirectory | None = None  # see adopt

    def adopt(self, base: ConvergedDirectory) -> None:
        """Start from a converged directory shared with other tables (a simulator hosting many nodes
        whose directories are the same; see ``protocol.member_base``): from now on the columns hold
        only what this node hears differently.  Only at start: the table holds nothing, or nothing but
        our own record (and status), which the base must hold with the same signed bytes unless it is
        empty (``ConvergedDirectory.empty()``: overlays from the first record on, adopted again once
        the real snapshot exists)."""
        i = self.me_index
        own = self.recs[i] if i < len(self.recs) else None
        st = self.statuses[i] if i < len(self.statuses) else None
        b = base.recs[i] if i < len(base.recs) else None
        if self.count != (own is not None) or (own is not None and base.count and (b is None or b.record != own.record)):
            raise LocalProtocolError("a table adopts a converged directory only at start, holding its own record")
        n = max(len(self.recs), len(base.recs))
        self.base = base
        self.recs = OverlayColumn(base.recs, None, n)  # type: ignore[assignment]
        self.statuses = OverlayColumn(base.statuses, None, n)  # type: ignore[assignment]
        self.liveness_codes = OverlayColumn(base.codes, UNKNOWN_CODE, n)  # type: ignore[assignment]
        self.alive = {r: OverlayIntSet(s) for r, s in base.alive.items()}  # type: ignore[misc]
        self.alive_all = OverlayIntSet(base.alive_all)  # type: ignore[assignment]
        self.dead, self.left = OverlayIntSet(), OverlayIntSet()  # type: ignore[assignment]
        self.count = base.count
        self.digest.adopt(base.bucket_values(self.digest.bucket_of, len(self.digest.records)))
        self.cert_fingerprint = base.cert_fingerprint
        self.next_expiry = base.next_expiry
        if b is not None:  # ourselves: in the base, never in our own alive sets
            self.alive_all.discard(i)
            self.alive[b.region].discard(i)
        elif own is not None:
            self.install(own, 0)
        if st is not None and (base.statuses[i] if i < len(base.statuses) else None) is not st:
            self.set_status(i, st)
        self.addresses.rebase(base.by_address)
        self.directory_dirty = self.peers_dirty = True
        self.alive_version += 1

    # -- lookups -------------------------------------------------------------------------------------
    def index_of(self, node_id: str) -> int | None:
        """The member index of ``node_id`` if it is a member."""
        i = self.index.of.get(node_id)
        if i is None or i >= len(self.recs) or self.recs[i] is None:
            return None
        return i

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self.index_of(node_id) is not None

    def __len__(self) -> int:
        return self.count

    def rec(self, node_id: str) -> Rec | None:
        """The verified record this node holds for ``node_id`` (shared, immutable)."""
        i = self.index.of.get(node_id)
        return self.recs[i] if i is not None and i < len(self.recs) else None

    def liveness(self, node_id: str) -> str | None:
        i = self.index_of(node_id)
        return None if i is None else LIVENESS_NAME[self.liveness_codes[i]]

    def is_alive(self, node_id: str) -> bool:
        i = self.index.of.get(node_id)
        return i is not None and i < len(self.liveness_codes) and self.liveness_codes[i] == ALIVE_CODE

    def status_of(self, node_id: str) -> StatusBody | None:
        i = self.index_of(node_id)
        st = self.statuses[i] if i is not None else None
        return st.body if st is not None else None

    def get(self, node_id: str) -> Member | None:
        """A snapshot of what we believe of ``node_id`` (None if it is not a member)."""
        i = self.index_of(node_id)
        if i is None:
            return None
        r = self.recs[i]
        assert r is not None
        st = self.statuses[i]
        return Member(r.node_id, r.region, r.address, r.incarnation, r.record, r.cert, r.cert_bytes,
                      LIVENESS_NAME[self.liveness_codes[i]], st.body if st else None, st.item if st else None,
                      self.heard_ms.get(i, NEVER_HEARD_MS))

    def records(self) -> Iterator[Rec]:
        """Every member's record (ourselves included), in index order."""
        return (r for r in self.recs if r is not None)

    def id_at(self, i: int) -> str:
        return self.ids[i]

    def rec_at(self, i: int) -> Rec | None:
        return self.recs[i] if i < len(self.recs) else None

    def record_of(self, node_id: str) -> bytes | None:
        i = self.index.of.get(node_id)
        r = self.recs[i] if i is not None and i < len(self.recs) else None
        return r.record if r is not None else None

    def status_item_of(self, node_id: str) -> Status | None:
        i = self.index.of.get(node_id)
        st = self.statuses[i] if i is not None and i < len(self.statuses) else None
        return st.item if st is not None else None

    def view_of(self, node_id: str) -> tuple[int, str] | None:
        """(incarnation, liveness) we hold of ``node_id`` (what a sync tells it about itself)."""
        i = self.index_of(node_id)
        if i is None:
            return None
        r = self.recs[i]
        assert r is not None
        return r.incarnation, LIVENESS_NAME[self.liveness_codes[i]]

    def suspicion_item(self, node_id: str) -> Suspect | None:
        """The suspicion we hold of ``node_id`` as a gossip item (None if we do not suspect it)."""
        i = self.index.of.get(node_id)
        if i is None or i >= len(self.liveness_codes) or self.liveness_codes[i] != SUSPECT_CODE:
            return None
        rec = self.recs[i]
        assert rec is not None
        return Suspect(rec.node_id, rec.incarnation, self.me)

    # -- addresses -----------------------------------------------------------------------------------
    def watch_addresses(self, addresses: Iterable[str]) -> None:
        """Keep ``by_address`` O(1) for these addresses (the seeds, looked up on every retry)."""
        self.addresses.watch(addresses, self.records())

    def by_address(self, address: str) -> str | None:
        """The member (node id) advertising ``address``, if any."""
        return self.addresses.find(address, self.recs, self.records())

    # -- anti-entropy digest (see protocol.gossip.sync_digest) -----------------------------------------
    def records_hash(self) -> bytes:
        """A digest of every member's (node id, incarnation)."""
        return self.digest.records_hash(self.count)

    def statuses_hash(self) -> bytes:
        """A digest of every member's (node id, status seq)."""
        return self.digest.statuses_hash(self.count)

    def bucket_entries(self, b: int, status: bool = False) -> tuple[tuple[str, int], ...]:
        """The sync entries of bucket ``b`` (``SyncDigest.entries``)."""
        return self.digest.entries(b, status, self.recs, self.statuses, self.cache.entries)

    # -- changes -------------------------------------------------------------------------------------
    def grow(self, i: int) -> None:
        """Make room in the columns for member index ``i`` (for every id known so far, once the table
        holds more than our own record: a table that only starts, as n simulated nodes booting side by
        side do before they adopt a converged directory, stays O(1))."""
        if i >= len(self.recs):
            if self.base is not None:  # overlays: no slots to allocate
                n = max(i + 1, len(self.ids))
                self.recs.n = self.statuses.n = self.liveness_codes.n = n  # type: ignore[attr-defined]
                return
            k = max(i + 1, len(self.ids)) - len(self.recs)
            self.recs.extend([None] * k)
            self.statuses.extend([None] * k)
            self.liveness_codes.extend(bytes(k))

    def install(self, rec: Rec, now_ms: int) -> None:
        """Hold ``rec`` (verified, newer than the one held) as the member's record."""
        i = rec.idx
        if i >= len(self.recs):
            self.grow(i)
        old = self.recs[i]
        self.recs[i] = rec
        w = self.addresses
        if w and (rec.address in w or (old is not None and old.address in w)):
            w.changed(old, rec)
        if old is None:
            self.count += 1
            self.alive_version += 1
            self.directory_dirty = True
            self.peers_dirty = True
            if rec.left:
                self.set_liveness(i, LEFT_CODE, now_ms, report=False)
            elif i == self.me_index:
                self.liveness_codes[i] = ALIVE_CODE
            else:
                self.liveness_codes[i] = ALIVE_CODE
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
            if old.region != rec.region and i != self.me_index:
                self.alive_version += 1
                moved = self.alive.get(old.region)
                if moved is not None and i in moved:
                    moved.discard(i)
                    self.alive.setdefault(rec.region, IntSet()).add(i)
            self.set_liveness(i, LEFT_CODE if rec.left else ALIVE_CODE, now_ms)
        if rec.cert.not_after < self.next_expiry:
            self.next_expiry = rec.cert.not_after
        self.cert_fingerprint += rec.cert_hash - (old.cert_hash if old is not None else 0)
        self.digest.record_changed(i, old.token if old is not None else 0, rec.token)

    def set_status(self, i: int, info: StatusInfo) -> None:
        old = self.statuses[i]
        self.statuses[i] = info
        self.digest.status_changed(i, old.token if old is not None else 0, info.token)

    def set_liveness(self, i: int, code: int, now_ms: int, report: bool = True, source: str = "") -> None:
        old = self.liveness_codes[i]
        if i == self.me_index:
            self.liveness_codes[i] = LEFT_CODE if code == LEFT_CODE else ALIVE_CODE
            return
        if old == code and report:
            return
        rec = self.recs[i]
        assert rec is not None
        self.liveness_codes[i] = code
        self.alive_version += 1
        rs = self.alive.get(rec.region)
        if rs is None:
            rs = self.alive[rec.region] = IntSet()
        if code == ALIVE_CODE:
            rs.add(i)
            self.alive_all.add(i)
        else:
            rs.discard(i)
            self.alive_all.discard(i)
        if code != SUSPECT_CODE:
            self.suspicions.pop(i, None)
        (self.dead.add if code == DEAD_CODE else self.dead.discard)(i)
        (self.left.add if code == LEFT_CODE else self.left.discard)(i)
        if report and old != code:
            self.outbox.append(LivenessChanged(rec.node_id, LIVENESS_NAME[code], rec.incarnation, source))

    def remove(self, node_id: str, reason: str) -> None:
        """Expel a member (its certificate is no longer valid): nothing of it is kept."""
        i = self.index_of(node_id)
        if i is None or i == self.me_index:
            return
        rec = self.recs[i]
        assert rec is not None
        for s in (self.alive.get(rec.region), self.alive_all, self.dead, self.left):
            if s is not None:
                s.discard(i)
        self.alive_version += 1
        self.suspicions.pop(i, None)
        self.heard_ms.pop(i, None)
        self.cert_fingerprint -= rec.cert_hash
        st = self.statuses[i]
        self.digest.record_changed(i, rec.token, 0)
        self.digest.status_changed(i, st.token if st is not None else 0, 0)  # (the count changes both digests)
        self.recs[i] = None
        self.statuses[i] = None
        self.liveness_codes[i] = UNKNOWN_CODE
        self.cache.forget_member(i)
        if rec.address in self.addresses:
            self.addresses.changed(rec, None)
        self.count -= 1
        self.directory_dirty = True
        self.peers_dirty = True
        self.outbox.append(Disconnect(node_id, reason))
        self.outbox.append(Alert("membership.expelled", {"node": node_id, "reason": reason}))

    def heard_from(self, peer: str, now_ms: int, horizon_ms: int) -> None:
        """A frame arrived from ``peer``: remember when (only the last ``horizon_ms`` matter)."""
        i = self.index.of.get(peer)
        if i is not None:
            heard = self.heard_ms
            heard[i] = now_ms
            if len(heard) > self._heard_cap:
                horizon = now_ms - horizon_ms
                self.heard_ms = {k: v for k, v in heard.items() if v >= horizon}
                self._heard_cap = max(512, 2 * len(self.heard_ms))  # amortised O(1) per frame
