"""The member directory handed to enforcement, and the members file.

Enforcement needs every valid member's certificate (its addresses and roles come from there).  The
directory is the members' certificates plus certificates remembered from the last run that are still
valid: after a restart, the directory enforced is the one from before it, until members are heard
from again.  Changes are debounced (``directory_debounce_for``) into one ``Enforce``; the members file
(``PersistMembers``) is written on its own interval, and always before enforcement acts on a new
directory (the restart path).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress
from operator import attrgetter

from protocol.errors import RemoteProtocolError, TrustError
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Effect, Enforce, MemberEntry, PersistMembers
from protocol.gossip.member_base import ConvergedDirectory, DirectoryView, EntriesView
from protocol.gossip.member_records import MemberRecords
from protocol.gossip.member_table import UNKNOWN_CODE, MemberTable
from protocol.gossip.members import Rec
from protocol.trust.metadata import Certificate
from protocol.trust.state import TrustedState


class MemberDirectory:
    def __init__(self, config: GossipConfig, trust: TrustedState, table: MemberTable, records: MemberRecords,
                 outbox: list[Effect], known_members: Sequence[MemberEntry]) -> None:
        """``known_members``: the members file of the last run."""
        self.cfg = config
        self.trust = trust
        self.table = table
        self.records = records
        self.outbox = outbox
        self._known_certs: dict[str, tuple[bytes, Certificate]] = {}  # node_id -> (exact bytes, decoded)
        for p in known_members:
            try:
                c = trust.check_certificate(p.cert)
            except (TrustError, RemoteProtocolError):
                continue
            if c.node_id == p.node_id:
                self._known_certs[c.node_id] = (p.cert, c)
        self._enforce_at: int | None = None  # when the debounced directory goes to enforcement
        self._persist_at: int | None = None  # when the members file is written next
        self._last: dict[str, Certificate] | None = None  # the directory last handed to Enforce
        self._last_fingerprint = 0  # ... and a digest of its certificates' exact bytes

    def start(self, now_ms: int) -> None:
        self._enforce_at = now_ms

    def next_deadline(self) -> int | None:
        if self._enforce_at is None:
            return self._persist_at
        if self._persist_at is None:
            return self._enforce_at
        return min(self._enforce_at, self._persist_at)

    def tick(self, now_ms: int, wall: float) -> None:
        if self.table.directory_dirty and self._enforce_at is None:
            self._enforce_at = now_ms + self.cfg.directory_debounce_for(len(self.table))
        if self._enforce_at is not None and now_ms >= self._enforce_at:
            self._enforce_at = None
            self._emit(wall)
        if self.table.peers_dirty and self._persist_at is None:
            self._persist_at = now_ms + self.cfg.peers_persist_interval_ms
        if self._persist_at is not None and now_ms >= self._persist_at:
            self._persist_at = None
            self._persist()

    def emit_if_changed_now(self, wall: float) -> None:
        """Without the debounce (revocations: enforcement hears of an expelled member at once)."""
        if self.table.directory_dirty:
            self._enforce_at = None
            self._emit(wall)

    def for_enforcement(self, wall: float) -> dict[str, Certificate]:
        """The directory to enforce a new policy with: the one enforcement has, else the current one."""
        return self._last if self._last is not None else self.current(wall)[0]

    def current(self, wall: float) -> tuple[dict[str, Certificate], int]:
        """The valid certificate directory (members, then certificates remembered from the last run
        that are still valid), and a digest of the certificates' exact bytes."""
        certs, fingerprint = table_certificates(self.table)
        if not self._known_certs:
            return certs, fingerprint
        if isinstance(certs, DirectoryView):  # over a shared base: extend a copy of its overlay
            certs = DirectoryView(certs.base, dict(certs.over), certs.gone)
            add_to = certs.over
        else:
            add_to = certs
        for nid, (cb, c) in list(self._known_certs.items()):
            if nid in certs:
                continue
            try:
                self.records.check_cert_valid(c, wall)
            except TrustError:
                del self._known_certs[nid]
                continue
            add_to[nid] = c
            fingerprint += hash(cb)
        return certs, fingerprint  # type: ignore[return-value]

    def _emit(self, wall: float) -> None:
        self.table.directory_dirty = False
        certs, fingerprint = self.current(wall)
        if certs != self._last or fingerprint != self._last_fingerprint:
            self._last, self._last_fingerprint = certs, fingerprint
            # the directory is durable before enforcement acts on it (restart path)
            self._persist()
            pol, h = self.trust.policy, self.trust.policy_hash
            if pol is not None and h is not None:
                self.outbox.append(Enforce(pol, h, certs))  # shared with _last: nobody mutates it

    def _persist(self) -> None:
        self.table.peers_dirty = False
        self._persist_at = None
        entries = table_member_entries(self.table)
        extra = [MemberEntry(nid, "", c.region, cb) for nid, (cb, c) in self._known_certs.items()
                 if nid not in self.table]
        if isinstance(entries, EntriesView):  # over a shared base: a view, not an O(n) copy
            self.outbox.append(PersistMembers(EntriesView(entries.base, entries.over, entries.skip,
                                                          entries.extra + extra) if extra else entries))
            return
        self.outbox.append(PersistMembers(tuple(entries + extra)))


# -- the table as enforcement and the member file see it -------------------------------------------
_cert_item, _entry = attrgetter("cert_item"), attrgetter("entry")


def table_certificates(table: MemberTable) -> tuple[dict[str, Certificate], int]:
    """Every member's certificate (ourselves included), and a digest of their exact bytes (a
    re-signed certificate with the same content is a change too).  Built in C (the liveness code
    is 0 exactly where no record is held): the directory is rebuilt on every change of a mass join.
    Over a converged base: a view of the base's plus what the table holds differently."""
    base = table.base
    if base is not None:
        changed, gone = _changed_over_base(table, base)
        view = DirectoryView(base.certs, {r.node_id: r.cert for r in changed}, gone)
        return view, table.cert_fingerprint  # type: ignore[return-value]
    return dict(map(_cert_item, compress(table.recs, table.liveness_codes))), table.cert_fingerprint  # type: ignore[arg-type]


def table_member_entries(table: MemberTable) -> list[MemberEntry]:
    """The member file's entries, ourselves excluded (built once per record)."""
    base = table.base
    if base is not None:
        changed, gone = _changed_over_base(table, base)
        known = base.certs
        over = {r.node_id: r.entry for r in changed if r.node_id in known}
        extra = [r.entry for r in changed if r.node_id not in known and r.idx != table.me_index]
        skip = gone | {table.me} if table.me in known else gone  # (skip: base members only)
        return EntriesView(base.entries, over, skip, extra)  # type: ignore[return-value]
    mask = table.liveness_codes
    if table.me_index < len(mask) and mask[table.me_index]:
        mask = bytearray(mask)
        mask[table.me_index] = UNKNOWN_CODE
    return list(map(_entry, compress(table.recs, mask)))  # type: ignore[arg-type]


def _changed_over_base(table: MemberTable, base: ConvergedDirectory) -> tuple[list[Rec], frozenset[str]]:
    """Records held that differ from the base's (index order), and base members no longer held."""
    over = table.recs.over  # type: ignore[attr-defined]
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
