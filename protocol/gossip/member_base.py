"""A converged member directory shared by many member tables, and the overlay columns over it.

Every node holds every member, so n nodes hosted in one process (the simulator) hold n^2 entries.
Where their directories are the same, they need not: a ``ConvergedDirectory`` is one immutable
snapshot of verified records and statuses (every member alive), and a ``MemberTable`` that adopts it
(``MemberTable.adopt``) keeps only what it has heard differently since, in overlays:

* ``OverlayColumn``: a list-like column (records, statuses, liveness codes) that reads through to the
  base where the node has no entry of its own; writing the base's own value back drops the entry.
* ``OverlayIntSet``: an ``IntSet`` (O(1) add, discard, uniform choice, positional access) over the
  base's set, its positions patched where members moved, left or joined (in one sorted int array).
* ``DirectoryView`` / ``EntriesView``: the directory handed to enforcement and the member file, as
  the base's plus the overlay's differences (an ``Enforce`` carries the data, not an O(n) copy).

Lookups, bucket digests and sync entries over base+overlay give what a plain table holding the same
entries gives.  The daemon never adopts a base: it keeps its whole directory, as enforcement needs.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from protocol.entropy import Entropy
from protocol.gossip.events import MemberEntry
from protocol.gossip.members import IntSet, Rec, StatusInfo
from protocol.gossip.wire import Alive, GossipItem, Status
from protocol.trust.metadata import Certificate

T = TypeVar("T")
_MISSING: Any = object()


def _same(a: object, b: object) -> bool:
    """The same entry: the same object, or a record/status with the same exact signed bytes."""
    if a is b:
        return True
    if type(a) is Rec and type(b) is Rec:
        return a.record == b.record  # type: ignore[union-attr]
    if type(a) is StatusInfo and type(b) is StatusInfo:
        return a.item == b.item  # type: ignore[union-attr]
    return False


class OverlayColumn(Generic[T]):
    """A column indexed by member index: the base's values, except where this node wrote its own."""

    __slots__ = ("base", "over", "n", "empty", "nb")

    def __init__(self, base: Sequence[T], empty: T, n: int = 0) -> None:
        self.base = base
        self.nb = len(base)  # (the base is immutable)
        self.over: dict[int, T] = {}
        self.n = max(n, len(base))
        self.empty = empty

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> T:
        v = self.over.get(i, _MISSING)
        if v is not _MISSING:
            return v  # type: ignore[no-any-return]
        if 0 <= i < self.nb and i < self.n:
            return self.base[i]
        if i < 0 or i >= self.n:
            raise IndexError(i)
        return self.empty

    def __setitem__(self, i: int, v: T) -> None:
        if i < 0 or i >= self.n:
            raise IndexError(i)
        base = self.base
        if i < len(base) and _same(base[i], v):
            self.over.pop(i, None)
        elif i >= len(base) and v is self.empty:
            self.over.pop(i, None)
        else:
            self.over[i] = v

    def extend(self, values: Sequence[Any]) -> None:
        """Grow by as many (empty) slots as ``values`` has."""
        self.n += len(values)

    def __iter__(self) -> Iterator[T]:
        over, base, nb = self.over, self.base, len(self.base)
        for i in range(self.n):
            v = over.get(i, _MISSING)
            yield (base[i] if i < nb else self.empty) if v is _MISSING else v


_PATCH = 1 << 31  # an OverlayIntSet's key of a position's member: this bit | the position
_LOW = 0xFFFFFFFF
_NOTHING = array("Q")  # the differences of every set that has none (shared, never written)


class _Items(Sequence[int]):
    """Positional access to an ``OverlayIntSet`` (what ``IntSet.items`` gives)."""

    __slots__ = ("s",)

    def __init__(self, s: OverlayIntSet) -> None:
        self.s = s

    def __len__(self) -> int:
        return self.s.m

    def __getitem__(self, p: int) -> int:  # type: ignore[override]
        s = self.s
        if p < 0:
            p += s.m
        if not 0 <= p < s.m:
            raise IndexError(p)
        v = s._get(_PATCH | p)
        return s.base.items[p] if v is None else v


class OverlayIntSet:
    """An ``IntSet`` over a shared base ``IntSet``: the same swap-remove positions, with what differs
    from the base (a member's position, -1 if absent; a position's member) in one sorted array of
    packed ``key << 32 | value + 1`` (keys: the member index, or ``_PATCH`` | the position), looked
    up by bisection: 8 bytes a difference, where two dicts and their int objects took about 100
    (100,000 simulated nodes each hearing of 100 changed members: ~1 GB)."""

    __slots__ = ("base", "diff", "m", "items")

    def __init__(self, base: IntSet | None = None) -> None:
        self.base = base if base is not None else IntSet()
        self.diff = _NOTHING
        self.m = len(self.base)
        self.items = _Items(self)

    def _get(self, key: int) -> int | None:
        d = self.diff
        if not d:
            return None
        j = bisect_left(d, key << 32)
        if j < len(d):
            x = d[j]
            if x >> 32 == key:
                return (x & _LOW) - 1
        return None

    def _set(self, key: int, v: int) -> None:
        d = self.diff
        if d is _NOTHING:
            d = self.diff = array("Q")
        j = bisect_left(d, key << 32)
        x = key << 32 | (v + 1)
        if j < len(d) and d[j] >> 32 == key:
            d[j] = x
        else:
            d.insert(j, x)

    def _drop(self, key: int) -> None:
        d = self.diff
        if d:
            j = bisect_left(d, key << 32)
            if j < len(d) and d[j] >> 32 == key:
                del d[j]

    def moved(self) -> Iterator[tuple[int, int]]:
        """(member, position or -1) of every member whose position differs from the base's."""
        for x in self.diff:
            k = x >> 32
            if k >= _PATCH:
                return
            yield k, (x & _LOW) - 1

    def moved_count(self) -> int:
        """How many members' positions differ from the base's."""
        return bisect_left(self.diff, _PATCH << 32)

    def _pos(self, i: int) -> int:
        p = self._get(i)
        if p is not None:
            return p
        bp = self.base._pos
        return bp[i] if 0 <= i < len(bp) else -1

    def _at(self, p: int) -> int:
        v = self._get(_PATCH | p)
        return self.base.items[p] if v is None else v

    def _put(self, p: int, i: int) -> None:
        base_items = self.base.items
        if p < len(base_items) and base_items[p] == i:
            self._drop(_PATCH | p)
        else:
            self._set(_PATCH | p, i)
        bp = self.base._pos
        if 0 <= i < len(bp) and bp[i] == p:
            self._drop(i)
        else:
            self._set(i, p)

    def add(self, i: int) -> None:
        if self._pos(i) < 0:
            self._put(self.m, i)
            self.m += 1

    def discard(self, i: int) -> None:
        p = self._pos(i)
        if p < 0:
            return
        self.m -= 1
        last = self._at(self.m)
        if p < self.m:
            self._put(p, last)
        self._drop(_PATCH | self.m)  # past the end: never read, rewritten by the next add
        bp = self.base._pos
        if 0 <= i < len(bp) and bp[i] >= 0:
            self._set(i, -1)
        else:
            self._drop(i)

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and self._pos(i) >= 0

    def __len__(self) -> int:
        return self.m

    def __iter__(self) -> Iterator[int]:
        return (self._at(p) for p in range(self.m))

    def choice(self, rng: Entropy) -> int:
        return self._at(rng.below(self.m))


class ConvergedDirectory:
    """One converged directory: every member's verified record and status, all alive (immutable
    once built; shared by every table that adopts it)."""

    def __init__(self, ids: Sequence[str], recs: Sequence[Rec], statuses: Sequence[StatusInfo | None]) -> None:
        n = len(ids)
        self.recs: list[Rec | None] = [None] * n
        self.statuses: list[StatusInfo | None] = [None] * n
        self.codes = bytearray(n)
        self.alive: dict[str, IntSet] = {}
        self.alive_all = IntSet()
        for rec, st in zip(recs, statuses, strict=True):
            i = rec.idx
            self.recs[i] = rec
            self.statuses[i] = st
            self.codes[i] = 1  # ALIVE_CODE
            self.alive.setdefault(rec.region, IntSet()).add(i)
            self.alive_all.add(i)
        present = [r for r in self.recs if r is not None]
        self.count = len(present)
        self.certs: dict[str, Certificate] = {r.node_id: r.cert for r in present}
        self.entries: tuple[MemberEntry, ...] = tuple(r.entry for r in present)
        self.cert_fingerprint = sum(r.cert_hash for r in present)
        self.next_expiry = min((r.cert.not_after for r in present), default=float("inf"))
        self.by_address: dict[str, int] = {}
        for r in present:
            self.by_address.setdefault(r.address, r.idx)
        self._bucket_values: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def empty(cls) -> ConvergedDirectory:
        return cls((), (), ())

    def holds(self, i: int | None, item: GossipItem) -> bool:
        """Whether ``item`` is member ``i``'s entry here, byte for byte: its signed record (``Alive``)
        or its signed status (``Status``).  Every table that adopts this base holds such an item."""
        if i is None or not 0 <= i < len(self.recs):
            return False
        if type(item) is Alive:
            rec = self.recs[i]
            return rec is not None and rec.record == item.record
        if type(item) is Status:
            st = self.statuses[i]
            return st is not None and st.item == item
        return False  # a suspicion or a death: the base holds every member alive

    def bucket_values(self, bucket_col: Sequence[int], nb: int) -> tuple[list[int], list[int]]:
        """The anti-entropy bucket values (XOR of record tokens, of status tokens) of the whole base."""
        got = self._bucket_values.get(nb)
        if got is None:
            rv, sv = [0] * nb, [0] * nb
            for i, r in enumerate(self.recs):
                if r is not None:
                    b = bucket_col[i]
                    rv[b] ^= r.token
                    st = self.statuses[i]
                    if st is not None:
                        sv[b] ^= st.token
            got = self._bucket_values[nb] = (rv, sv)
        return got


class DirectoryView(Mapping[str, Certificate]):
    """node id -> certificate: the base's, then the overlay's changes (``over``) and removals (``gone``)."""

    __slots__ = ("base", "over", "gone")

    def __init__(self, base: Mapping[str, Certificate], over: dict[str, Certificate], gone: frozenset[str]) -> None:
        self.base = base
        self.over = over
        self.gone = gone

    def __getitem__(self, key: str) -> Certificate:
        v = self.over.get(key)
        if v is not None:
            return v
        if key in self.gone:
            raise KeyError(key)
        return self.base[key]

    def __contains__(self, key: object) -> bool:
        return key in self.over or (key in self.base and key not in self.gone)

    def __len__(self) -> int:
        return len(self.base) - len(self.gone) + sum(1 for k in self.over if k not in self.base)

    def __iter__(self) -> Iterator[str]:
        gone, over = self.gone, self.over
        for k in self.base:
            if k not in gone:
                yield k
        for k in over:
            if k not in self.base:
                yield k

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DirectoryView) and other.base is self.base:
            return self.over == other.over and self.gone == other.gone
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):  # O(overlay): a directory before and after a snapshot differ here
            return False
        return Mapping.__eq__(self, other)

    def __hash__(self) -> int:  # a Mapping is not hashable; keep it so
        raise TypeError("unhashable type: 'DirectoryView'")

    def dropped_from(self, before: Mapping[str, Certificate]) -> list[str] | None:
        """Members of ``before`` missing here, cheaply when both views share a base (else None)."""
        if not isinstance(before, DirectoryView) or before.base is not self.base:
            return None
        out = [k for k in self.gone if k not in before.gone and k not in self.over]
        out += [k for k in before.over if k not in self]
        return out


class EntriesView(Sequence[MemberEntry]):
    """The member file's entries: the base's (minus ``skip``, with ``over`` replacing by node id),
    then ``extra``."""

    __slots__ = ("base", "over", "skip", "extra", "_n")

    def __init__(self, base: tuple[MemberEntry, ...], over: dict[str, MemberEntry], skip: frozenset[str],
                 extra: list[MemberEntry]) -> None:
        self.base = base
        self.over = over
        self.skip = skip
        self.extra = extra
        self._n = len(base) - len(skip) + len(extra)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[MemberEntry]:
        skip, over = self.skip, self.over
        for e in self.base:
            if e.node_id not in skip:
                yield over.get(e.node_id, e)
        yield from self.extra

    def __getitem__(self, k: int) -> MemberEntry:  # type: ignore[override]
        return list(self)[k]  # rare (tests); iteration is the use
