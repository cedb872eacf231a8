"""The member table: what this node believes of every member, in columns indexed by member index.

Per member it holds the verified record (``Rec``), the verified status (``StatusInfo``), a liveness
byte, the suspicion under way (if any) and when we last heard from it; per region the set of alive
members; and the anti-entropy bucket values (XOR of per-member tokens over (node_id, incarnation) and
(node_id, status seq)), so a directory digest costs O(1) to maintain.  The storage types (``Rec``,
``IntSet``, the shared ``VerifyCache`` and ``MemberIndex``) live in ``protocol.gossip.members``.

The table verifies nothing (``protocol.gossip.member_records`` does, before anything is installed) and
decides nothing: it installs, reports liveness changes (``LivenessChanged``) and expulsions
(``Disconnect``, ``Alert``) to ``outbox`` in order, and answers lookups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter

from protocol.errors import LocalProtocolError
from protocol.gossip.events import Alert, Disconnect, Effect, LivenessChanged, MemberEntry
from protocol.gossip.member_base import (
    ConvergedDirectory,
    DirectoryView,
    EntriesView,
    OverlayColumn,
    OverlayIntSet,
)
from protocol.gossip.members import IntSet, Member, Rec, StatusInfo, VerifyCache
from protocol.gossip.wire import HASH_PREFIX, Status, StatusBody, Suspect
from protocol.trust.metadata import Certificate

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
        self._watched: dict[str, int] = {}  # address -> member index advertising it (-1: nobody yet)
        self.alive: dict[str, IntSet] = {}  # region -> alive member indexes (self excluded)
        self.alive_all = IntSet()
        self.dead = IntSet()
        self.left = IntSet()
        self.alive_version = 0  # bumped whenever the alive sets may have changed (memo key, see broadcast_tree)
        self.tree_memo: tuple[int, int, tuple[str, ...], tuple[str, ...]] | None = None  # broadcast_tree's
        self._bucket_col, self.bucket_ids = self.index.buckets(sync_buckets)
        self.record_buckets = [0] * sync_buckets  # records: (node_id, incarnation)
        self.status_buckets = [0] * sync_buckets  # status: (node_id, status seq)
        self._records_hash: bytes | None = None
        self._statuses_hash: bytes | None = None
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
        self.record_buckets, self.status_buckets = (list(v) for v in base.bucket_values(self._bucket_col,
                                                                                       len(self.record_buckets)))
        self._records_hash = self._statuses_hash = None
        self.cert_fingerprint = base.cert_fingerprint
        self.next_expiry = base.next_expiry
        if b is not None:  # ourselves: in the base, never in our own alive sets
            self.alive_all.discard(i)
            self.alive[b.region].discard(i)
        elif own is not None:
            self.install(own, 0)
        if st is not None and (base.statuses[i] if i < len(base.statuses) else None) is not st:
            self.set_status(i, st)
        for a in self._watched:
            self._watched[a] = base.by_address.get(a, -1)
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

    def certs(self) -> tuple[dict[str, Certificate], int]:
        """Every member's certificate (ourselves included), and a digest of their exact bytes (a
        re-signed certificate with the same content is a change too).  Built in C (the liveness code
        is 0 exactly where no record is held): the directory is rebuilt on every change of a mass join."""
        if self.base is not None:
            return self._certs_over_base(self.base)
        return dict(map(_cert_item, compress(self.recs, self.liveness_codes))), self.cert_fingerprint  # type: ignore[arg-type]

    def _changed_over_base(self, base: ConvergedDirectory) -> tuple[list[Rec], frozenset[str]]:
        """Records held that differ from the base's (index order), and base members no longer held."""
        over = self.recs.over  # type: ignore[attr-defined]
        nb = len(base.recs)
        changed: list[Rec] = []
        gone: list[str] = []
        for i in sorted(over):
            r = over[i]
            if r is None:
                if i < nb and (b := base.recs[i]) is not None:
                    gone.append(b.node_id)
            else:
                changed.append(r)
        return changed, frozenset(gone)

    def _certs_over_base(self, base: ConvergedDirectory) -> tuple[dict[str, Certificate], int]:
        changed, gone = self._changed_over_base(base)
        view = DirectoryView(base.certs, {r.node_id: r.cert for r in changed}, gone)
        return view, self.cert_fingerprint  # type: ignore[return-value]

    def member_entries(self) -> list[MemberEntry]:
        """The member file's entries, ourselves excluded (built once per record)."""
        if self.base is not None:
            changed, gone = self._changed_over_base(self.base)
            known = self.base.certs
            over = {r.node_id: r.entry for r in changed if r.node_id in known}
            extra = [r.entry for r in changed if r.node_id not in known and r.idx != self.me_index]
            skip = gone | {self.me} if self.me in known else gone  # (skip: base members only)
            return EntriesView(self.base.entries, over, skip, extra)  # type: ignore[return-value]
        mask = self.liveness_codes
        if self.me_index < len(mask) and mask[self.me_index]:
            mask = bytearray(mask)
            mask[self.me_index] = UNKNOWN_CODE
        return list(map(_entry, compress(self.recs, mask)))  # type: ignore[arg-type]

    # -- addresses -----------------------------------------------------------------------------------
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
            r = self.recs[i] if i >= 0 else None
            return r.node_id if r is not None and r.address == address else None
        for r in self.records():
            if r.address == address:
                return r.node_id
        return None

    # -- anti-entropy digest -------------------------------------------------------------------------
    def _summary(self, vals: list[int]) -> bytes:
        raw = b"".join(v.to_bytes(8, "big") for v in vals)
        return hashlib.blake2b(raw + self.count.to_bytes(4, "big"), digest_size=HASH_PREFIX).digest()

    def records_hash(self) -> bytes:
        """A digest of every member's (node id, incarnation)."""
        if self._records_hash is None:
            self._records_hash = self._summary(self.record_buckets)
        return self._records_hash

    def statuses_hash(self) -> bytes:
        """A digest of every member's (node id, status seq)."""
        if self._statuses_hash is None:
            self._statuses_hash = self._summary(self.status_buckets)
        return self._statuses_hash

    def bucket_entries(self, b: int, status: bool = False) -> tuple[tuple[str, int], ...]:
        """(node id, incarnation) — or (node id, status seq, 0 if none) — of every member in bucket
        ``b``, in index order.  Shared through the cache's ``entries`` by bucket content (its
        anti-entropy values; a per-table copy would cost O(n) per node)."""
        key = (b, int(status), self.record_buckets[b], self.status_buckets[b] if status else 0)
        cache = self.cache.entries
        got = cache.get(key)
        if got is None:
            recs, n = self.recs, len(self.recs)
            if status:
                sts = self.statuses
                got = tuple([(r.node_id, st.body.seq if (st := sts[i]) is not None else 0)
                             for i in self.bucket_ids[b] if i < n and (r := recs[i]) is not None])
            else:
                got = tuple([r.sync_entry for i in self.bucket_ids[b] if i < n and (r := recs[i]) is not None])
            cache.put(key, got)
        return got

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
        w = self._watched
        if w and (rec.address in w or (old is not None and old.address in w)):
            self._watch(old, rec)
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
        b = self._bucket_col[i]
        self.record_buckets[b] ^= (old.token if old is not None else 0) ^ rec.token
        self._records_hash = None

    def set_status(self, i: int, info: StatusInfo) -> None:
        old = self.statuses[i]
        self.statuses[i] = info
        b = self._bucket_col[i]
        self.status_buckets[b] ^= (old.token if old is not None else 0) ^ info.token
        self._statuses_hash = None

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
        b = self._bucket_col[i]
        self.record_buckets[b] ^= rec.token
        st = self.statuses[i]
        if st is not None:
            self.status_buckets[b] ^= st.token
        self.recs[i] = None
        self.statuses[i] = None
        self.liveness_codes[i] = UNKNOWN_CODE
        self.cache.forget_member(i)
        if rec.address in self._watched:
            self._watch(rec, None)
        self.count -= 1
        self._records_hash = self._statuses_hash = None
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
