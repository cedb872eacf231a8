"""Dissemination: announce digests, pull bodies (lazy push), one pull at a time per version.

A node that accepts a new policy announces its digest (serial, hash, root version) at once to
``fanout`` peers, then again every ``announce_interval_ms`` for ``announce_rounds`` rounds in total,
never to a peer known to hold that serial already.  A node that learns of a newer digest pulls the
envelope from one announcer; if the body does not arrive within the pull timeout (or the announcer
fails, or sends something stale or forged) it pulls from the next announcer, so a body crosses each
link at most once per version.  Periodic push-pull anti-entropy (in the node) feeds the same
``offer`` path, which is what guarantees convergence after a partition heals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .entropy import Entropy
from .gossip_config import GossipConfig
from .gossip_wire import Announce, Digest, PolicyPull
from .membership import Membership

Key = tuple[int, int]  # Digest.key: (root version, serial)


@dataclass(slots=True)
class _Pull:
    peer: str
    key: Key
    deadline_ms: int


class Dissemination:
    def __init__(self, config: GossipConfig, rng: Entropy, membership: Membership,
                 send: Callable[[str, object], None], connected: Callable[[str], bool]) -> None:
        self.cfg = config
        self.rng = rng
        self.mem = membership
        self._send = send
        self._connected = connected
        self.has: dict[str, Key] = {}  # peer -> newest version it is known to hold
        self.told: dict[str, Key] = {}  # peer -> newest version we announced to it
        self.announcing: Digest | None = None
        self.rounds_left = 0
        self.next_round_ms: int | None = None
        self.want: Digest | None = None
        self.sources: list[str] = []
        self.tried: dict[str, int] = {}  # peer -> when we last pulled `want` from it
        self.pull: _Pull | None = None
        self.counters = {"announces_sent": 0, "pulls_sent": 0, "pull_timeouts": 0, "bodies_served": 0}

    # -- what peers hold -----------------------------------------------------------------------------
    def note_has(self, peer: str, key: Key) -> None:
        if key > self.has.get(peer, (0, 0)):
            self.has[peer] = key

    def holds(self, peer: str, d: Digest) -> bool:
        key = d.key
        if self.has.get(peer, (0, 0)) >= key or self.told.get(peer, (0, 0)) >= key:
            return True
        st = self.mem.status_of(peer)
        # A signed status names serial and hash prefix (no root version): only an exact match counts.
        return st is not None and st.serial == d.serial and bool(st.policy_hash) and d.hash.startswith(st.policy_hash)

    # -- announcing ----------------------------------------------------------------------------------
    def on_accepted(self, digest: Digest, now_ms: int) -> None:
        self.announcing = digest
        self.rounds_left = self.cfg.announce_rounds
        if self.want is not None and self.want.key <= digest.key:
            self.want, self.sources, self.tried, self.pull = None, [], {}, None
        self._round(now_ms)

    def _round(self, now_ms: int) -> None:
        d = self.announcing
        if d is None or self.rounds_left <= 0:
            self.next_round_ms = None
            return
        self.rounds_left -= 1
        targets = self.mem.pick(self.cfg.fanout, lambda p: self.holds(p, d), self._connected)
        for peer in targets:
            self.told[peer] = d.key
            self.counters["announces_sent"] += 1
            self._send(peer, Announce(d))
        self.next_round_ms = now_ms + self.cfg.announce_interval_ms if self.rounds_left > 0 else None

    def announce_to(self, peer: str, digest: Digest) -> None:
        """Tell one peer that is behind (learned from its own announce or sync) what we hold."""
        if self.told.get(peer, (0, 0)) >= digest.key:
            return
        self.told[peer] = digest.key
        self.counters["announces_sent"] += 1
        self._send(peer, Announce(digest))

    # -- pulling -------------------------------------------------------------------------------------
    def offer(self, peer: str, digest: Digest, now_ms: int) -> None:
        """``peer`` holds ``digest``, newer than ours: remember it as a source and pull if idle."""
        self.note_has(peer, digest.key)
        w = self.want
        if w is None or digest.key > w.key:
            self.want, self.sources, self.tried = digest, [peer], {}
            if self.pull is not None and self.pull.key < digest.key:
                self.pull = None
        elif digest.key == w.key and (digest.hash == w.hash or not digest.hash or not w.hash):
            if not w.hash and digest.hash:
                self.want = digest  # a full digest replaces one learned from a probe (serial only)
            if peer not in self.sources:
                self.sources.append(peer)
        else:
            return
        if self.pull is None:
            self._start_pull(now_ms)

    def _timeout(self, peer: str) -> int:
        r = self.mem.rec(peer)
        if r is not None and r.region != self.mem.region:
            return self.cfg.cross_region_pull_timeout_ms
        return self.cfg.pull_timeout_ms

    def _start_pull(self, now_ms: int) -> None:
        w = self.want
        self.pull = None
        if w is None:
            return
        retry_after = 4 * self.cfg.cross_region_pull_timeout_ms
        fresh = [p for p in self.sources if now_ms - self.tried.get(p, -retry_after) >= retry_after]
        if not fresh:
            return
        # Prefer an open channel in our region, then any open channel, then anyone.
        def rank(p: str) -> int:
            r = self.mem.rec(p)
            local = r is not None and r.region == self.mem.region
            return (0 if self._connected(p) else 2) + (0 if local else 1)

        best = min(rank(p) for p in fresh)
        choices = [p for p in fresh if rank(p) == best]
        peer = self.rng.choice(choices)
        self.tried[peer] = now_ms
        self.pull = _Pull(peer, w.key, now_ms + self._timeout(peer))
        self.counters["pulls_sent"] += 1
        self._send(peer, PolicyPull(w.serial, w.hash))

    def pull_failed(self, peer: str, now_ms: int) -> None:
        """The peer we pull from failed (send failed, channel lost, stale or bad body)."""
        if self.pull is not None and self.pull.peer == peer:
            self._start_pull(now_ms)

    def forget_source(self, peer: str) -> None:
        if peer in self.sources:
            self.sources.remove(peer)

    def done(self, key: Key) -> None:
        if self.want is not None and self.want.key <= key:
            self.want, self.sources, self.tried, self.pull = None, [], {}, None

    # -- timers --------------------------------------------------------------------------------------
    def tick(self, now_ms: int) -> None:
        if self.next_round_ms is not None and now_ms >= self.next_round_ms:
            self._round(now_ms)
        if self.pull is not None and now_ms >= self.pull.deadline_ms:
            self.counters["pull_timeouts"] += 1
            self._start_pull(now_ms)

    def next_deadline(self) -> int | None:
        d = self.next_round_ms
        if self.pull is not None and (d is None or self.pull.deadline_ms < d):
            d = self.pull.deadline_ms
        return d
