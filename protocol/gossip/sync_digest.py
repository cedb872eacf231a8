"""The anti-entropy digest of one member table, kept O(1) per change.

Members are spread over ``sync_buckets`` buckets by a hash of their node id.  Per bucket the digest
holds the XOR of 64-bit tokens of every member's (node id, incarnation), and of (node id, status
seq): installing, replacing or removing a record or status is two XORs.  The table digests
(``records_hash``, ``statuses_hash``) summarise the bucket values and the member count; two tables
with equal digests hold the same versions, and where they differ the bucket values say which
buckets to compare entry by entry (``entries``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from protocol.gossip.members import BucketEntriesCache, MemberIndex, Rec, StatusInfo
from protocol.gossip.wire import HASH_PREFIX


class SyncDigest:
    __slots__ = ("bucket_of", "bucket_ids", "records", "statuses", "_records_hash", "_statuses_hash")

    def __init__(self, index: MemberIndex, buckets: int) -> None:
        self.bucket_of, self.bucket_ids = index.buckets(buckets)  # per member index; per bucket (shared)
        self.records = [0] * buckets  # records: (node_id, incarnation)
        self.statuses = [0] * buckets  # status: (node_id, status seq)
        self._records_hash: bytes | None = None
        self._statuses_hash: bytes | None = None

    def adopt(self, values: tuple[list[int], list[int]]) -> None:
        """Start from a converged directory's bucket values (records, statuses)."""
        self.records, self.statuses = (list(v) for v in values)
        self._records_hash = self._statuses_hash = None

    def record_changed(self, i: int, old_token: int, new_token: int) -> None:
        """Member ``i``'s record changed (a token of 0: none)."""
        self.records[self.bucket_of[i]] ^= old_token ^ new_token
        self._records_hash = None

    def status_changed(self, i: int, old_token: int, new_token: int) -> None:
        """Member ``i``'s status changed (a token of 0: none)."""
        self.statuses[self.bucket_of[i]] ^= old_token ^ new_token
        self._statuses_hash = None

    def _summary(self, vals: list[int], count: int) -> bytes:
        raw = b"".join(v.to_bytes(8, "big") for v in vals)
        return hashlib.blake2b(raw + count.to_bytes(4, "big"), digest_size=HASH_PREFIX).digest()

    def records_hash(self, count: int) -> bytes:
        """A digest of every member's (node id, incarnation) (``count``: how many members)."""
        if self._records_hash is None:
            self._records_hash = self._summary(self.records, count)
        return self._records_hash

    def statuses_hash(self, count: int) -> bytes:
        """A digest of every member's (node id, status seq)."""
        if self._statuses_hash is None:
            self._statuses_hash = self._summary(self.statuses, count)
        return self._statuses_hash

    def entries(self, b: int, status: bool, recs: Sequence[Rec | None], statuses: Sequence[StatusInfo | None],
                cache: BucketEntriesCache) -> tuple[tuple[str, int], ...]:
        """(node id, incarnation) — or (node id, status seq, 0 if none) — of every member in bucket
        ``b``, in index order.  Shared through ``cache`` by bucket content (its anti-entropy values;
        a per-table copy would cost O(n) per node)."""
        key = (b, int(status), self.records[b], self.statuses[b] if status else 0)
        got = cache.get(key)
        if got is None:
            n = len(recs)
            if status:
                got = tuple([(r.node_id, st.body.seq if (st := statuses[i]) is not None else 0)
                             for i in self.bucket_ids[b] if i < n and (r := recs[i]) is not None])
            else:
                got = tuple([r.sync_entry for i in self.bucket_ids[b] if i < n and (r := recs[i]) is not None])
            cache.put(key, got)
        return got
