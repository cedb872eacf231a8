"""Dissemination: push bodies along the broadcast tree (eager), announce digests and pull bodies
(lazy); every peer claim is a bounded hint.

A node that accepts a new policy whose envelope is at most ``eager_push_max_bytes`` returns its
broadcast-tree neighbours (``protocol.broadcast_tree``) except the sender, for the node to push the
body to at once: one trip per hop.  It announces its digest (serial, hash, root version) to ``fanout``
peers ``announce_interval_ms`` later (at once when it pushed to nobody), then again every
``announce_interval_ms`` for ``announce_rounds`` rounds in total, never to a peer known to hold that
serial already or pushed to; a peer the tree missed pulls from whoever announced (Plumtree's graft).  Periodic push-pull anti-entropy (in the node)
feeds the same ``offer`` path, which is what guarantees convergence after a partition heals.

**Peers are claims, not facts** (the ledger of claims is ``protocol.gossip.claim_book``).  What a peer says it holds (an announce, a sync digest, the serial
on a probe) is a *claim*: a candidate version ``(root version, serial, hash)`` with that peer as one
of its sources.

* Each peer has at most one live claim (a newer claim replaces its older one) and a claim lives
  ``CLAIM_TTL_MS`` unless the peer repeats it; at most ``MAX_CLAIMS`` candidates are kept, so memory
  is fixed per peer and in total.
* Every candidate is pulled on its own (one outstanding pull per candidate, from one of its sources),
  so a claim nobody serves never shadows a version somebody does serve: a lie about serial 2^62 costs
  one pull that times out, while the real next version is pulled at the same time from its sources.
* A source that does not serve what it claimed (timeout, stale or foreign body) loses the claim, is
  not asked for that candidate again for ``retry_after_ms``, and is charged with it in the
  ``PeerConduct`` ledger (one alert per episode; repeat offenders are disconnected).
* Which offers are stale is decided by the node against its *trusted* floor only, never against a
  claim.

Equal (root version, serial) with different hashes is an equivocation: the node offers the other hash
here like any candidate (to fetch and verify it), and ``done`` keeps such candidates alive.

What dissemination sends, alerts or disconnects goes to ``outbox`` (the node's ordered effect list);
``next_deadline()`` is the earliest of its timers.
"""

from __future__ import annotations

from typing import Any

from protocol.entropy import Entropy
from protocol.gossip.broadcast_tree import push_targets, tree_neighbours
from protocol.gossip.claim_book import CLAIM_TTL_MS, Claim, ClaimBook, ClaimId, Key, Pull
from protocol.gossip.conduct import PeerConduct
from protocol.gossip.config import GossipConfig
from protocol.gossip.connected_peers import ConnectedPeers
from protocol.gossip.events import Disconnect, Effect
from protocol.gossip.membership import Membership
from protocol.gossip.wire import Announce, Digest, PolicyPull


class Dissemination:
    def __init__(self, config: GossipConfig, rng: Entropy, membership: Membership, connected: ConnectedPeers,
                 conduct: PeerConduct, outbox: list[Effect]) -> None:
        self.cfg = config
        self.rng = rng
        self.membership = membership
        self.members = membership.table
        self.connected = connected
        self.conduct = conduct
        self.outbox = outbox
        self.has: dict[str, Key] = {}  # peer -> newest version it is known to hold
        self.told: dict[str, Key] = {}  # peer -> newest version we announced to it
        self._last_key: Key = (0, 0)  # the key stored last: the entries of has/told share one tuple
        self.announcing: Digest | None = None
        self.rounds_left = 0
        self.next_round_ms: int | None = None
        self.failed: dict[str, tuple[ClaimId, int]] = {}  # peer -> claim it did not serve, until when
        self.unserved: dict[str, int] = {}  # peer -> claims it did not serve (never reset; members only)
        self.retry_after_ms = 4 * config.cross_region_pull_timeout_ms
        self.counters = {"announces_sent": 0, "pulls_sent": 0, "pull_timeouts": 0, "bodies_served": 0,
                         "bodies_pushed": 0, "unserved_claims": 0, "claims_evicted": 0}
        self.book = ClaimBook(self.counters)
        self.claims = self.book.claims  # candidate -> its claim (the book's, shared)
        self.claim_of = self.book.claim_of  # peer -> its one live claim

    def _send(self, peer: str, msg: Any) -> None:
        self.outbox.append(self.membership.piggyback.send(peer, msg))

    # -- what peers hold -----------------------------------------------------------------------------
    def _shared(self, key: Key) -> Key:
        """``key``, or the equal tuple stored last: nearly every entry of ``has`` and ``told`` names the
        same version or two, and each ``Digest.key`` is a new tuple (~60 B a peer, x every node in the
        simulator)."""
        if key == self._last_key:
            return self._last_key
        self._last_key = key
        return key

    def note_has(self, peer: str, key: Key) -> None:
        if key > self.has.get(peer, (0, 0)):
            self.has[peer] = self._shared(key)

    def holds(self, peer: str, d: Digest) -> bool:
        key = d.key
        if self.has.get(peer, (0, 0)) >= key or self.told.get(peer, (0, 0)) >= key:
            return True
        st = self.members.status_of(peer)
        # A signed status names serials and hash prefixes (no root version): only an exact match counts.
        if st is None:
            return False
        if st.trusted_serial == d.serial and st.trusted_hash and d.hash.startswith(st.trusted_hash):
            return True
        return st.serial == d.serial and bool(st.policy_hash) and d.hash.startswith(st.policy_hash)

    # -- pushing and announcing -----------------------------------------------------------------------
    def on_accepted(self, digest: Digest, now_ms: int, sender: str | None = None, body_bytes: int = 0
                    ) -> list[str]:
        """We trust ``digest`` now (received from ``sender``, None for a local source): returns the peers
        to push the body to at once (the tree neighbours that may not hold it), and schedules the
        announces (one interval later when the body goes along the tree, to give the tree its chance)."""
        self.announcing = digest
        self.rounds_left = self.cfg.announce_rounds
        self.done(digest.key, digest.hash)
        if not self.cfg.eager_push_max_bytes or body_bytes > self.cfg.eager_push_max_bytes:
            self._round(now_ms)
            return []
        eager: list[str] = []
        for peer in push_targets(self.members, self.cfg.tree_degree, sender):
            if not self.holds(peer, digest):
                self.told[peer] = self._shared(digest.key)
                eager.append(peer)
        self.counters["bodies_pushed"] += len(eager)
        self.next_round_ms = now_ms + self.cfg.announce_interval_ms  # the tree first, then the announces
        return eager

    def cold_tree_neighbours(self) -> list[str]:
        """Tree neighbours without an open channel: the node opens one (a push must not wait for a dial)."""
        if not self.cfg.eager_push_max_bytes:
            return []
        return [p for p in tree_neighbours(self.members, self.cfg.tree_degree) if p not in self.connected]

    def _round(self, now_ms: int) -> None:
        d = self.announcing
        if d is None or self.rounds_left <= 0:
            self.next_round_ms = None
            return
        self.rounds_left -= 1
        targets = self.membership.pick(self.cfg.fanout, lambda p: self.holds(p, d), self.connected.__contains__)
        for peer in targets:
            self.told[peer] = self._shared(d.key)
            self.counters["announces_sent"] += 1
            self._send(peer, Announce(d))
        self.next_round_ms = now_ms + self.cfg.announce_interval_ms if self.rounds_left > 0 else None

    def announce_to(self, peer: str, digest: Digest, force: bool = False) -> None:
        """Tell one peer that is behind (learned from its own announce or sync) what we hold.
        ``force``: it holds the same version with another hash (an equivocation it must resolve)."""
        if self.told.get(peer, (0, 0)) >= digest.key and not force:
            return
        self.told[peer] = self._shared(digest.key)
        self.counters["announces_sent"] += 1
        self._send(peer, Announce(digest))

    # -- claims --------------------------------------------------------------------------------------
    def offer(self, peer: str, digest: Digest, now_ms: int, wait_ms: int = 0) -> None:
        """``peer`` claims to hold ``digest``, which the node wants (newer, or an equivocating hash at
        its own version): make it a candidate with ``peer`` as a source, and pull it if idle.
        ``wait_ms``: a claim that is no announce (a probe's serial, a sync digest) may have overtaken
        the tree push of that version: a new candidate is pulled only after that long (Plumtree's
        graft timer), unless the push arrives first or an announce asks for a pull at once."""
        self.note_has(peer, digest.key)
        cid = self.book.id_for(digest)
        bad = self.failed.get(peer)
        if bad is not None:
            if now_ms < bad[1] and bad[0][0] == cid[0] and (bad[0][1] == cid[1] or not cid[1] or not bad[0][1]):
                return  # it did not serve this a moment ago: not a source for it until the retry time
            if now_ms >= bad[1]:
                del self.failed[peer]
        claim = self.claims.get(cid)
        if claim is None:
            if not self.book.make_room(digest):
                return
            claim = self.claims[cid] = Claim(digest, not_before=now_ms + wait_ms)
        elif not wait_ms and claim.not_before > now_ms:
            claim.not_before = now_ms
        if digest.hash and not claim.digest.hash:
            claim.digest = digest
        old = self.claim_of.get(peer)
        if old is not None and old != cid:
            self.book.drop_source(peer, old)
        claim.sources[peer] = now_ms + CLAIM_TTL_MS
        self.claim_of[peer] = cid
        if claim.pull is None:
            self._start_pull(claim, now_ms)

    # -- pulling -------------------------------------------------------------------------------------
    def _timeout(self, peer: str) -> int:
        r = self.members.rec(peer)
        if r is not None and r.region != self.members.region:
            return self.cfg.cross_region_pull_timeout_ms
        return self.cfg.pull_timeout_ms

    def _start_pull(self, claim: Claim, now_ms: int) -> None:
        claim.pull = None
        if now_ms < claim.not_before:
            return
        claim.not_before = 0  # (only a pending wait is a deadline)
        retry_after = self.retry_after_ms
        fresh = [p for p, exp in claim.sources.items()
                 if exp > now_ms and now_ms - claim.tried.get(p, -retry_after) >= retry_after]
        if not fresh:
            return

        # Prefer an open channel in our region, then any open channel, then anyone; a peer that left
        # claims unserved before comes last.
        def rank(p: str) -> tuple[int, int]:
            r = self.members.rec(p)
            local = r is not None and r.region == self.members.region
            return (min(self.unserved.get(p, 0), 3), (0 if p in self.connected else 2) + (0 if local else 1))

        best = min(rank(p) for p in fresh)
        choices = sorted(p for p in fresh if rank(p) == best)
        peer = self.rng.choice(choices)
        claim.tried[peer] = now_ms
        claim.pull = Pull(peer, now_ms + self._timeout(peer))
        self.counters["pulls_sent"] += 1
        d = claim.digest
        self._send(peer, PolicyPull(d.serial, d.hash))

    def pull_failed(self, peer: str, now_ms: int, unserved: bool = False) -> None:
        """The peer we pull from failed: send failed or channel lost (``unserved`` false), or it
        answered with a stale, foreign or bad body (``unserved`` true: charged to the peer)."""
        for cid, claim in list(self.claims.items()):
            if claim.pull is not None and claim.pull.peer == peer:
                self._pull_over(cid, claim, now_ms, unserved)

    def body_from(self, peer: str, key: Key, digest_hash: bytes, now_ms: int) -> None:
        """A body of version ``key`` arrived from ``peer``: it answers our pulls from that peer of
        versions up to ``key``; a pull of anything newer was not served (the claim was a lie).  The
        same version with another hash means the peer moved on (an equivocation it resolved): it is
        no longer a source of that hash, without blame."""
        for cid, claim in list(self.claims.items()):
            if claim.pull is not None and claim.pull.peer == peer:
                if key > cid[0] or (key == cid[0] and cid[1] in (digest_hash, b"")):
                    claim.pull = None  # answered: the node accepts or refuses the body itself
                elif key == cid[0]:
                    claim.pull = None
                    self.book.drop_source(peer, cid)
                else:
                    self._pull_over(cid, claim, now_ms, unserved=True)

    def _pull_over(self, cid: ClaimId, claim: Claim, now_ms: int, unserved: bool) -> None:
        assert claim.pull is not None
        peer = claim.pull.peer
        claim.pull = None
        if unserved:
            self.counters["unserved_claims"] += 1
            self.unserved[peer] = self.unserved.get(peer, 0) + 1
            self.failed[peer] = (cid, now_ms + self.retry_after_ms)
            self.book.drop_source(peer, cid)
            d = claim.digest
            facts = {"serial": d.serial, "root_version": d.root_version, "hash": d.hash.hex()[:16]}
            effects = self.conduct.charge(peer, "unserved_claim", facts, now_ms, self.connected)
            self.outbox += effects
            if any(isinstance(e, Disconnect) for e in effects):
                self.forget_source(peer)
        if cid in self.claims:
            self._start_pull(claim, now_ms)
            if claim.pull is None and not any(exp > now_ms for exp in claim.sources.values()):
                self.book.drop(cid)

    def forget_source(self, peer: str) -> None:
        self.book.forget_source(peer)

    def forget_peer(self, peer: str) -> None:
        """The peer left the directory: nothing of it is kept."""
        self.forget_source(peer)
        for m in (self.has, self.told, self.failed, self.unserved):
            m.pop(peer, None)

    def done(self, key: Key, digest_hash: bytes = b"") -> None:
        """We hold ``key`` (with ``digest_hash``): see ``ClaimBook.done``."""
        self.book.done(key, digest_hash)

    def drop_candidate(self, key: Key, digest_hash: bytes) -> None:
        self.book.drop((key, digest_hash))

    @property
    def wanted(self) -> list[Digest]:
        return self.book.wanted

    @property
    def pull(self) -> Pull | None:
        """The outstanding pull of the highest candidate (for tests and diagnostics)."""
        live = [(cid, c) for cid, c in self.claims.items() if c.pull is not None]
        return max(live, key=lambda x: x[0])[1].pull if live else None

    # -- timers --------------------------------------------------------------------------------------
    def tick(self, now_ms: int) -> None:
        if self.next_round_ms is not None and now_ms >= self.next_round_ms:
            self._round(now_ms)
        if not self.claims:
            return
        for cid, claim in list(self.claims.items()):
            if cid not in self.claims:
                continue
            if claim.pull is not None:
                if now_ms >= claim.pull.deadline_ms:
                    self.counters["pull_timeouts"] += 1
                    self._pull_over(cid, claim, now_ms, unserved=True)
                continue
            for p in [p for p, exp in claim.sources.items() if exp <= now_ms]:
                self.book.drop_source(p, cid)
            if cid in self.claims:
                self._start_pull(claim, now_ms)

    def next_deadline(self) -> int | None:
        d = self.next_round_ms
        for claim in self.claims.values():
            at = claim.pull.deadline_ms if claim.pull is not None else claim.not_before
            if at and (d is None or at < d):
                d = at
        return d
