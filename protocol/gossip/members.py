"""The member table's storage: interned node ids, the shared verify cache, and verified records.

Every node knows every member, so the table is n entries per node and n^2 in a simulator that hosts n
nodes.  It is therefore columnar: node ids are interned as small integers by a ``MemberIndex`` (one
per ``VerifyCache``, so the simulator's nodes share one); what a verified record or status says is an
immutable, shared ``Rec`` / ``StatusInfo``; per node there remain a list slot per member for each of
them, a liveness byte, and array-backed sets of member indexes (``IntSet``).
"""

from __future__ import annotations

import hashlib
import weakref
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.entropy import Entropy
from protocol.gossip.events import MemberEntry
from protocol.gossip.wire import MemberRecord, Status, StatusBody, cert_ref
from protocol.trust.metadata import Certificate

CACHE_MAX_BYTES = 64 << 20  # VerifyCache: estimated bytes before a generation clear
CACHE_ENTRY_BYTES = 1024  # estimate for a cached object of unknown size (a decoded certificate)


def _token(node_id: str, version: int) -> int:
    h = hashlib.blake2b(f"{node_id}|{version}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def bucket_of(node_id: str, buckets: int) -> int:
    return hashlib.blake2b(node_id.encode(), digest_size=2).digest()[0] % buckets


class MemberIndex:
    """Node ids interned as small integers, with per-bucket id lists.  Shared by every node that
    shares a ``VerifyCache`` (a simulator's nodes): an index entry says only that some verified
    record named this id, never what a node believes of it."""

    __slots__ = ("ids", "of", "_buckets", "_bucket_lists")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.of: dict[str, int] = {}
        self._buckets: dict[int, bytearray] = {}
        self._bucket_lists: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def intern(self, node_id: str) -> int:
        i = self.of.get(node_id)
        if i is None:
            i = len(self.ids)
            self.ids.append(node_id)
            self.of[node_id] = i
            for nb, col in self._buckets.items():
                b = bucket_of(node_id, nb)
                col.append(b)
                self._bucket_lists[nb][b].append(i)
        return i

    def buckets(self, nb: int) -> tuple[bytearray, list[list[int]]]:
        """(bucket of each id, ids of each bucket) for ``nb`` buckets; both grow with the index."""
        col = self._buckets.get(nb)
        if col is None:
            col = bytearray(bucket_of(nid, nb) for nid in self.ids)
            lists: list[list[int]] = [[] for _ in range(nb)]
            for i, b in enumerate(col):
                lists[b].append(i)
            self._buckets[nb] = col
            self._bucket_lists[nb] = lists
        return col, self._bucket_lists[nb]


class VerifyCache:
    """Results of signature checks keyed by the exact bytes (and the root they were checked
    against).  One cache may be shared by many nodes in one process (the simulator does): a result
    depends only on the bytes and the trusted root, never on the node.  The cache also carries the
    ``MemberIndex`` of the node ids its records named.  ``get`` is the dict's own (a hot path).

    Only verified objects enter it, and what it holds itself is bounded in bytes, not entries: at
    most one record and one status per member (``put_member``: a newer one supersedes the one held,
    an older one is not held), and everything is let go at once (a generation clear) when the
    estimated size passes ``max_bytes``.  What is let go stays findable through ``weak_get`` for as
    long as some member table still holds it (the simulator's lagging nodes share it instead of
    decoding their own copy); a node's own table holds one version per member, so in the daemon a
    superseded record is freed as soon as it is replaced.  A clear costs re-verification, never
    correctness."""

    __slots__ = ("_d", "_weak", "_latest", "max_bytes", "nbytes", "clears", "index", "get", "weak_get", "entries")

    def __init__(self, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self._d: dict[object, object] = {}
        self._weak: weakref.WeakValueDictionary[object, object] = weakref.WeakValueDictionary()
        # (kind, member index) -> (version, key, estimated bytes) of the one entry held per member
        self._latest: dict[tuple[str, int], tuple[int, object, int]] = {}
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.clears = 0
        self.index = MemberIndex()
        # sync bucket entries by (kind, bucket, bucket values): see SyncDigest.entries
        self.entries = BucketEntriesCache()
        self.get: Callable[[object], object | None] = self._d.get
        self.weak_get: Callable[[object], object | None] = self._weak.get

    def __len__(self) -> int:
        return len(self._d)

    def _let_go(self, key: object) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self._weak[key] = v

    def _room(self, nbytes: int) -> None:
        if self.nbytes + nbytes > self.max_bytes:
            for _version, key, _n in self._latest.values():
                self._let_go(key)
            self._d.clear()  # the same dict: ``get`` stays bound to it
            self._latest.clear()
            self.nbytes = 0
            self.clears += 1

    def put(self, key: object, value: object, nbytes: int = CACHE_ENTRY_BYTES) -> None:
        """Hold a verified ``value`` (e.g. a decoded certificate) under ``key``."""
        if key in self._d:
            return
        self._room(nbytes)
        self._d[key] = value
        self.nbytes += nbytes

    def put_member(self, kind: str, idx: int, version: int, key: object, value: object, nbytes: int) -> bool:
        """Hold the verified record (``kind`` "r") or status ("s") of member ``idx`` at ``version``,
        letting go of the one it supersedes; an older version than the one held is not held (False).
        ``value`` must be weak-referenceable."""
        slot = (kind, idx)
        cur = self._latest.get(slot)
        if cur is not None:
            if cur[1] == key:
                return False
            if cur[0] > version:
                self._weak[key] = value
                return False
            self._let_go(cur[1])
            self.nbytes -= cur[2]
        self._room(nbytes)
        self._d[key] = value
        self._latest[slot] = (version, key, nbytes)
        self.nbytes += nbytes
        return True

    def forget_member(self, idx: int) -> None:
        """Let go of what is held for member ``idx`` (expelled)."""
        for kind in ("r", "s"):
            cur = self._latest.pop((kind, idx), None)
            if cur is not None:
                self._let_go(cur[1])
                self.nbytes -= cur[2]


class BucketEntriesCache:
    """Sync entries of one bucket, keyed by what the bucket holds: the bucket index and its anti-entropy
    values (XOR of 64-bit tokens of (node id, incarnation), and of (node id, status seq)), which is what
    the sync protocol itself takes as "the same content".  Tables that hold the same bucket share one
    tuple (the simulator's nodes share the cache); bounded: cleared when it passes ``max_entries``."""

    __slots__ = ("_d", "max_entries", "get")

    def __init__(self, max_entries: int = 4096) -> None:
        self._d: dict[tuple[int, int, int, int], tuple[tuple[str, int], ...]] = {}
        self.max_entries = max_entries
        self.get = self._d.get

    def put(self, key: tuple[int, int, int, int], entries: tuple[tuple[str, int], ...]) -> None:
        if len(self._d) >= self.max_entries:
            self._d.clear()  # the same dict: ``get`` stays bound to it
        self._d[key] = entries

    def __len__(self) -> int:
        return len(self._d)


class IndexedSet:
    """A set of strings with O(1) add, discard and uniform random choice."""

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


class IntSet:
    """A set of member indexes with O(1) add, discard and uniform random choice, in two int arrays
    (4 bytes per slot, where a dict would take about 40)."""

    __slots__ = ("items", "_pos")

    def __init__(self) -> None:
        self.items = array("i")
        self._pos = array("i")

    def add(self, i: int) -> None:
        pos = self._pos
        if i >= len(pos):
            pos.extend(array("i", [-1]) * (i + 1 - len(pos)))
        if pos[i] < 0:
            pos[i] = len(self.items)
            self.items.append(i)

    def discard(self, i: int) -> None:
        pos = self._pos
        if i >= len(pos) or pos[i] < 0:
            return
        p = pos[i]
        pos[i] = -1
        last = self.items.pop()
        if p < len(self.items):
            self.items[p] = last
            pos[last] = p

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and 0 <= i < len(self._pos) and self._pos[i] >= 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)

    def choice(self, rng: Entropy) -> int:
        return self.items[rng.below(len(self.items))]


class Rec:
    """One verified member record: immutable and shared by every node that holds it."""

    __slots__ = ("node_id", "idx", "region", "address", "incarnation", "left", "features", "record", "cert",
                 "cert_bytes", "cert_ref", "token", "entry", "cert_item", "cert_hash", "sync_entry", "relay", "__weakref__")

    def __init__(self, idx: int, rec: MemberRecord, cert: Certificate, record: bytes) -> None:
        self.node_id = rec.node_id
        self.idx = idx
        self.region = cert.region
        self.address = rec.address
        self.incarnation = rec.incarnation
        self.left = rec.left
        self.features = rec.features  # what the member reads (wire.READS_RECORD_REFS)
        self.record = record
        self.cert = cert
        self.cert_bytes = rec.cert
        self.cert_ref = cert_ref(rec.cert)  # the name of its certificate in an AliveRef
        self.token = _token(rec.node_id, rec.incarnation)
        # the member's entry in the persisted member file
        self.entry = MemberEntry(rec.node_id, rec.address, cert.region, rec.cert)
        # the member's entry in the directory handed to enforcement, and a digest of its exact bytes
        self.cert_item = (rec.node_id, cert)
        self.cert_hash = hash(rec.cert)
        self.sync_entry = (rec.node_id, rec.incarnation)  # its anti-entropy entry (see SyncDigest.entries)
        # its piggyback forms, made on its first relay (record_refs.relay_forms): one copy however many
        # nodes relay it (in the simulator, every node of the mesh)
        self.relay: tuple | None = None


class StatusInfo:
    """One decoded status item (shared); ``verified_key`` is the identity key its signature checked
    out against (a status is only believed for the member whose current key that is)."""

    __slots__ = ("body", "item", "token", "verified_key", "rejected_key", "__weakref__")

    def __init__(self, body: StatusBody, item: Status) -> None:
        self.body = body
        self.item = item
        self.token = _token(body.node_id, body.seq)
        self.verified_key = b""
        self.rejected_key = b""


@dataclass(slots=True, eq=False)
class Member:
    """A snapshot of what this node believes of one member (for views and tests, not hot paths)."""

    node_id: str
    region: str
    address: str
    incarnation: int
    record: bytes
    cert: Certificate
    cert_bytes: bytes
    liveness: str
    status: StatusBody | None
    status_item: Status | None
    heard_ms: int

    @property
    def status_seq(self) -> int:
        return self.status.seq if self.status else 0
