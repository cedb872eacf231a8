"""Push-pull anti-entropy of the member directory, joining through seeds, and retrying the silent.

Every ``sync_interval_ms`` a node sends a ``Sync`` to a random in-region member (and every
``cross_region_sync_interval_ms`` to a member of another region): its policy digest, root version,
and the digests of the member table (records and, rate-limited, statuses).  The receiver answers
with its own, plus its bucket values where the digests differ; the first side then sends the entries
(node id, version) of the differing buckets, and each side pulls what the other holds newer
(``MemberPull`` / ``Members``).  The policy half of a sync (digest and root comparison) is the node's.

Joining: at start a node knows seed addresses only; it sends ``Sync(record=own record)`` to one of
them by address (and to a few members remembered from the last run), and retries the others while
nobody answers.  Once somebody has answered, a seed whose address is still unknown is dialled one per
retry: a joiner whose directory is still arriving does not know the seeds' addresses yet, and a Sync
to each of them would bring the whole directory once per seed (20 copies of 66 MB at 100,000 members).

One member reconciliation at a time: a reply whose buckets differ while the entries sent to another
peer are still being answered waits for that one to end (``MAX_WAITING_REPLIES``, the newest per
peer), and is then compared against what we hold by then.  A reconciliation ends when the peer's first
``Members`` has not come within twice the cross-region pull timeout, or when its last ``Members`` that
taught us something is that long ago (a directory comes in chunks; under loss they come slowly), and
after ``RECONCILE_MAX_MS`` in any case.  A node that joins through many seeds answering at once (its
first answer slow, it retried them all) so pulls the directory about once instead of from every seed;
a peer that sends nothing, or nothing new, holds the others up for a few seconds only (a peer
initiating a sync is answered at once, as before: it reconciles on its side).  Only replies to a
``Sync`` we sent (to that peer, or by address while joining, within ``ASKED_WINDOW_MS``) reconcile or
wait; an unasked reply is refused and counted (``sync_replies_unasked``), so a lying member can hold
up at most the reconciliations we start with it.

Partitioned members are retried forever: one random dead member, plus one in every region where
nobody is alive.

Sends go to the membership ``outbox`` in order; ``next_deadline()`` is the earliest of the timers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from protocol.entropy import Entropy
from protocol.errors import RemoteProtocolError
from protocol.gossip import wire
from protocol.gossip.broadcasts import Piggyback
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Effect, MemberEntry, Send
from protocol.gossip.member_records import MemberRecords
from protocol.gossip.member_table import DEAD, LEFT, SUSPECT, MemberTable
from protocol.gossip.own_record import OwnRecord
from protocol.gossip.peer_selection import pick, pick_cross_region
from protocol.gossip.wire import Digest, MemberPull, Members, Sync, SyncEntries, View, encode

MEMBERS_CHUNK_BYTES = 256 << 10  # records per Members message: well under the message cap
MAX_WAITING_REPLIES = 8  # sync replies held while another reconciliation is under way
RECONCILE_MAX_MS = 30_000  # a reconciliation holds the waiting replies up for this long at most
ASKED_WINDOW_MS = 30_000  # a peer's sync reply is one we asked for this long after our Sync to it
MAX_ASKED = 64  # peers we remember asking (a few syncs per interval: the oldest go first)
STATUS_ITEM_OVERHEAD_BYTES = 72  # a status item's signature and framing, beyond its payload


# -- bucket digests ----------------------------------------------------------------------------------
def bucket_hashes(table: MemberTable, status: bool = False) -> tuple[bytes, ...]:
    return tuple(v.to_bytes(8, "big") for v in (table.digest.statuses if status else table.digest.records))


def differing_buckets(table: MemberTable, theirs: tuple[bytes, ...], status: bool = False) -> list[int]:
    vals = table.digest.statuses if status else table.digest.records
    if len(theirs) != len(vals):
        raise RemoteProtocolError(f"peer uses {len(theirs)} sync buckets, we use {len(vals)}")
    return [i for i, v in enumerate(vals) if v.to_bytes(8, "big") != theirs[i]]


def entries(table: MemberTable, buckets: Iterable[int], status: bool = False) -> tuple[tuple[str, int], ...]:
    """(node id, incarnation) — or (node id, status seq) — of every member in ``buckets``."""
    out: list[tuple[str, int]] = []
    nb = len(table.digest.bucket_ids)
    for b in buckets:
        if 0 <= b < nb:
            out += table.bucket_entries(b, status)
    return tuple(out)


def entry_batches(table: MemberTable, buckets: Iterable[int], status: bool, cap: int
                  ) -> Iterator[tuple[tuple[int, ...], tuple[tuple[str, int], ...]]]:
    """``entries`` of ``buckets`` grouped into messages of at most ``cap`` entries (whole buckets
    per message; a bucket larger than ``cap`` on its own is split)."""
    group: list[int] = []
    acc: list[tuple[str, int]] = []
    for b in buckets:
        mine = entries(table, (b,), status)
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


def compare_entries(table: MemberTable, buckets: Iterable[int], theirs_entries: Iterable[tuple[str, int]],
                    status: bool) -> tuple[list[str], list[str]]:
    """Given a peer's entries for ``buckets``: (ids whose record/status we want, ids whose
    record/status they lack)."""
    theirs = dict(theirs_entries)
    theirs.pop(table.me, None)
    mine: dict[str, int] = {}  # dict(entries(...)), without the intermediate tuples
    nb = len(table.digest.bucket_ids)
    for b in buckets:
        if 0 <= b < nb:
            mine.update(table.bucket_entries(b, status))
    get = mine.get
    if status:
        want = [nid for nid, v in theirs.items() if nid in mine and v > mine[nid]]
    else:
        want = [nid for nid, v in theirs.items() if v > get(nid, -1)]
    tget = theirs.get
    # (a status entry of 0 is a member whose status we do not hold, unless it signed seq 0 itself)
    give = [nid for nid, v in mine.items() if v > tget(nid, -1)
            and (not status or v > 0 or table.status_item_of(nid) is not None)]
    return want, give


class AntiEntropy:
    def __init__(self, config: GossipConfig, rng: Entropy, table: MemberTable, own: OwnRecord,
                 records: MemberRecords, piggyback: Piggyback, outbox: list[Effect], seeds: Sequence[str],
                 known_peers: Sequence[MemberEntry]) -> None:
        self.cfg = config
        self.rng = rng
        self.table = table
        self.own = own
        self.records = records
        self.piggyback = piggyback
        self.outbox = outbox
        self.seeds = list(seeds)
        self.known_peers = list(known_peers)  # members remembered from the last run, with an address
        self.sync_at = 0
        self.cross_sync_at = 0
        self.retry_dead_at = 0
        self.retry_seeds_at = 0
        self.due = 0  # the earliest of the timers (kept by start and tick: asked on every step)
        self.status_sync_at = 0
        self.reconciling: tuple[str, int, int] | None = None  # (peer, until ms, end at the latest)
        self.waiting: dict[str, tuple[tuple[bytes, ...] | None, tuple[bytes, ...] | None]] = {}  # peer -> buckets
        self.asked: dict[str, int] = {}  # peer -> until when its sync reply is one we asked for
        self.asked_any_until = 0  # a Sync sent by address (seeds): any member's reply counts as asked

    def _send(self, peer: str, msg: Any) -> None:
        self.outbox.append(self.piggyback.send(peer, msg))

    # -- timers --------------------------------------------------------------------------------------
    def start(self, now_ms: int) -> None:
        """Arm the timers."""
        self.sync_at = now_ms + self.rng.below(self.cfg.sync_interval_ms)
        self.cross_sync_at = now_ms + self.rng.below(self.cfg.cross_region_sync_interval_ms)
        self.retry_dead_at = now_ms + self.cfg.dead_retry_interval_ms
        self.retry_seeds_at = now_ms + self.cfg.seed_retry_lonely_ms
        self._set_due()

    def _set_due(self) -> None:
        r = self.reconciling
        self.due = min(self.sync_at, self.cross_sync_at, self.retry_dead_at, self.retry_seeds_at,
                       r[1] if r is not None else self.sync_at)

    def join(self, now_ms: int, digest: Digest | None, root_version: int) -> None:
        """Contact one seed (and a few remembered peers after a restart): that is enough to join; the
        rest are retried when nobody answers (see _retry_seeds)."""
        if self.seeds:
            self._sync_addr(self.rng.choice(self.seeds), now_ms, digest, root_version)
        for p in self.rng.sample(self.known_peers, self.cfg.fanout):
            self._sync_addr(p.address, now_ms, digest, root_version)

    def tick(self, now_ms: int, digest: Digest | None, root_version: int) -> None:
        cfg, rng = self.cfg, self.rng
        r = self.reconciling
        if r is not None and now_ms >= r[1]:
            self.reconciling = None
            self._next_waiting(now_ms)
        if now_ms >= self.sync_at:
            self.sync_at = now_ms + rng.jitter(cfg.sync_interval_ms)
            for peer in pick(self.table, rng, 1, lambda p: False, None, cross=0):
                self.sync_peer(peer, now_ms, digest, root_version)
        if now_ms >= self.cross_sync_at:
            self.cross_sync_at = now_ms + rng.jitter(cfg.cross_region_sync_interval_ms)
            for peer in pick_cross_region(self.table, rng):
                self.sync_peer(peer, now_ms, digest, root_version)
        if now_ms >= self.retry_dead_at:
            self.retry_dead_at = now_ms + rng.jitter(cfg.dead_retry_interval_ms)
            self._retry_dead(now_ms, digest, root_version)
        if now_ms >= self.retry_seeds_at:
            lonely = len(self.table.alive_all) == 0
            self.retry_seeds_at = now_ms + rng.jitter(
                cfg.seed_retry_lonely_ms if lonely else cfg.seed_retry_interval_ms)
            self._retry_seeds(lonely, now_ms, digest, root_version)
        self._set_due()

    def next_deadline(self) -> int:
        return self.due

    def _retry_dead(self, now_ms: int, digest: Digest | None, root_version: int) -> None:
        """Partitioned members are retried forever: one random dead member, plus one in every region
        where nobody is alive."""
        table = self.table
        targets: list[str] = []
        dead = table.dead
        if len(dead):
            targets.append(table.id_at(dead.choice(self.rng)))
        regions_alive = {r for r, s in table.alive.items() if len(s)}
        silent: dict[str, list[str]] = {}
        for i in dead:
            rec = table.rec_at(i)
            if rec is not None and rec.region not in regions_alive and rec.region != table.region:
                silent.setdefault(rec.region, []).append(rec.node_id)
        for r in sorted(silent):
            targets.append(self.rng.choice(silent[r]))
        for nid in dict.fromkeys(targets):
            self.sync_peer(nid, now_ms, digest, root_version, with_record=True)

    def _retry_seeds(self, lonely: bool, now_ms: int, digest: Digest | None, root_version: int) -> None:
        addrs = list(self.seeds)
        if lonely:
            addrs += [p.address for p in self.rng.sample(self.known_peers, self.cfg.fanout)]
        dialled = False  # (answered: one unknown seed per retry, see the module docstring)
        for addr in addrs:
            nid = self.table.by_address(addr)
            if nid is None:
                if lonely or not dialled:
                    self._sync_addr(addr, now_ms, digest, root_version)
                dialled = True
            elif nid != self.table.me and not self.table.is_alive(nid):
                self.sync_peer(nid, now_ms, digest, root_version, with_record=True)

    # -- sync ----------------------------------------------------------------------------------------
    def _sync_msg(self, peer: str | None, with_record: bool, now_ms: int, digest: Digest | None,
                  root_version: int) -> Sync:
        view = self.table.view_of(peer) if peer else None
        shash = b""
        if now_ms >= self.status_sync_at:  # status reconciliation is rate-limited
            self.status_sync_at = now_ms + self.cfg.status_sync_interval_ms
            shash = self.table.statuses_hash()
        return Sync(False, digest, root_version, self.table.records_hash(), shash,
                    View(*view) if view else None, self.own.record if with_record or view is None else None)

    def sync_peer(self, peer: str, now_ms: int, digest: Digest | None, root_version: int,
                  with_record: bool = False) -> None:
        self._note_asked(peer, now_ms)
        self._send(peer, self._sync_msg(peer, with_record, now_ms, digest, root_version))

    def _note_asked(self, peer: str, now_ms: int) -> None:
        asked = self.asked
        asked.pop(peer, None)
        asked[peer] = now_ms + ASKED_WINDOW_MS
        if len(asked) > MAX_ASKED:
            for p in [p for p, until in asked.items() if until <= now_ms] or [next(iter(asked))]:
                del asked[p]

    def _was_asked(self, peer: str, now_ms: int) -> bool:
        return now_ms < self.asked_any_until or now_ms < self.asked.get(peer, 0)

    def _sync_addr(self, address: str, now_ms: int, digest: Digest | None, root_version: int) -> None:
        """"Dial this address, whoever it is" (bootstrapping from seed addresses)."""
        self.asked_any_until = now_ms + ASKED_WINDOW_MS
        self.outbox.append(Send("", address, encode(self._sync_msg(None, True, now_ms, digest, root_version))))

    def on_sync_view(self, msg: Sync, now_ms: int, wall: float) -> None:
        """The membership half of a received ``Sync``, before the policy half: the sender's record,
        and what it believes of us (refuted when it is suspect, dead or left)."""
        if msg.record is not None:
            self.records.learn_relayed_record(msg.record, now_ms, wall)
        if msg.you is not None and msg.you.incarnation >= self.own.incarnation and \
                msg.you.liveness in (SUSPECT, DEAD, LEFT) and not self.own.left_cluster:
            self.own.refute(now_ms, msg.you.incarnation)

    def answer_sync(self, peer: str, msg: Sync, digest: Digest | None, root_version: int, now_ms: int) -> None:
        """After the policy half: answer a first ``Sync`` with ours (and our bucket values where the
        digests differ); answer a reply with the entries of the buckets that differ (one
        reconciliation at a time: see the module docstring)."""
        table = self.table
        if not msg.reply:
            view = table.view_of(peer)
            mine = table.records_hash()
            smine = table.statuses_hash() if msg.shash else b""
            self._send(peer, Sync(True, digest, root_version, mine, smine,
                                  View(*view) if view else None,
                                  self.own.record if msg.you is None else None,
                                  bucket_hashes(table) if mine != msg.mhash else None,
                                  bucket_hashes(table, True) if msg.shash and smine != msg.shash else None))
            return
        for status, theirs in ((False, msg.buckets), (True, msg.sbuckets)):
            n = len(table.digest.statuses if status else table.digest.records)
            if theirs is not None and len(theirs) != n:
                raise RemoteProtocolError(f"peer uses {len(theirs)} sync buckets, we use {n}")
        if msg.buckets is None and msg.sbuckets is None:
            return
        if not self._was_asked(peer, now_ms):
            # a reply to a Sync we never sent: refused and counted, so that members who push
            # unasked replies cannot hold our reconciliations or fill the waiting replies
            self.records.counters["sync_replies_unasked"] += 1
            return
        r = self.reconciling
        if r is not None and now_ms < r[1]:
            if peer in self.waiting or len(self.waiting) < MAX_WAITING_REPLIES:
                self.waiting.pop(peer, None)  # (the newest goes to the back: a chatty peer waits its turn)
                self.waiting[peer] = (msg.buckets, msg.sbuckets)
            return
        self._reconcile(peer, msg.buckets, msg.sbuckets, now_ms)

    def _reconcile(self, peer: str, buckets: tuple[bytes, ...] | None, sbuckets: tuple[bytes, ...] | None,
                   now_ms: int) -> None:
        """Send ``peer`` the entries of the buckets where its values differ from ours: it sends what
        we lack (``Members``), and asks for what it lacks (``MemberPull``)."""
        table = self.table
        sent = False
        for status, theirs in ((False, buckets), (True, sbuckets)):
            if theirs is not None:
                diff = differing_buckets(table, theirs, status)
                for group, batch in entry_batches(table, diff, status, wire.MAX_BATCH):
                    self._send(peer, SyncEntries(status, group, batch))
                    sent = True
        if sent:
            wait = 2 * self.cfg.cross_region_pull_timeout_ms  # for its first Members
            self.reconciling = (peer, now_ms + wait, now_ms + RECONCILE_MAX_MS)
            self._set_due()

    def _next_waiting(self, now_ms: int) -> None:
        """The reconciliation under way ended: the oldest waiting reply that still differs is next."""
        while self.reconciling is None and self.waiting:
            peer = next(iter(self.waiting))
            buckets, sbuckets = self.waiting.pop(peer)
            if self.table.index_of(peer) is not None:
                self._reconcile(peer, buckets, sbuckets, now_ms)

    def on_sync_entries(self, peer: str, msg: SyncEntries) -> None:
        want, give = compare_entries(self.table, msg.buckets, msg.entries, msg.status)
        if give:
            self._send_members(peer, () if msg.status else give, give if msg.status else ())
        cap = wire.MAX_BATCH
        for k in range(0, len(want), cap):
            chunk = tuple(want[k:k + cap])
            self._send(peer, MemberPull(() if msg.status else chunk, chunk if msg.status else ()))

    def _send_members(self, peer: str, rec_ids: Sequence[str], st_ids: Sequence[str]) -> None:
        """Records and statuses in as many messages as the caps on items and bytes require."""
        table = self.table
        cap = wire.MAX_BATCH
        records: list[bytes] = []
        statuses: list[Any] = []
        size = 0

        def flush() -> None:
            nonlocal records, statuses, size
            if records or statuses:
                self._send(peer, Members(tuple(records), tuple(statuses)))
            records, statuses, size = [], [], 0

        of, recs, infos = table.index.of, table.recs, table.statuses
        nrecs, ninfos = len(recs), len(infos)
        for n in rec_ids:
            i = of.get(n)  # (table.record_of, inlined: one call per record served)
            rec = recs[i] if i is not None and i < nrecs else None
            if rec is not None:
                r = rec.record
                if len(records) >= cap or size + len(r) > MEMBERS_CHUNK_BYTES:
                    flush()
                records.append(r)
                size += len(r)
        for n in st_ids:
            i = of.get(n)  # (table.status_item_of, inlined)
            info = infos[i] if i is not None and i < ninfos else None
            if info is not None:
                st = info.item
                if len(statuses) >= cap or size + len(st.payload) + STATUS_ITEM_OVERHEAD_BYTES > MEMBERS_CHUNK_BYTES:
                    flush()
                statuses.append(st)
                size += len(st.payload) + STATUS_ITEM_OVERHEAD_BYTES
        flush()

    def on_member_pull(self, peer: str, msg: MemberPull) -> None:
        self._send_members(peer, msg.records, msg.statuses)

    def on_members(self, peer: str, msg: Members, now_ms: int, wall: float) -> None:
        learned = False
        for rec in msg.records:
            learned |= self.records.learn_relayed_record(rec, now_ms, wall, rebroadcast=False)
        for st in msg.statuses:
            learned |= self.records.learn_status(st)
        r = self.reconciling
        if r is not None and r[0] == peer and learned:  # its answer is coming: wait for its next chunk
            self.reconciling = (peer, min(now_ms + self.cfg.cross_region_pull_timeout_ms, r[2]), r[2])
            self._set_due()
