"""What a peer's claimed policy version means for us.

Peers say which policy they hold: a ``Digest`` (root version, serial, payload hash) in announces and
syncs, a bare (root version, serial) on every probe.  Compared with ours, a claim is newer (offer it to
dissemination, and ask the peer for roots first if it claims a newer root), older (announce ours), the
same (note that the peer has it), or the same version with another payload hash: a possible
equivocation, fetched unless we already verified and refused it.
"""

from __future__ import annotations

import functools

from protocol.gossip.broadcasts import Piggyback
from protocol.gossip.config import GossipConfig
from protocol.gossip.dissemination import Dissemination
from protocol.gossip.events import Effect
from protocol.gossip.wire import Digest, RootPull
from protocol.trust.state import TrustedState

MAX_ROOT_ASKS_TRACKED = 4096  # (peer -> when we last asked it for roots) entries


def held_key(trust: TrustedState) -> tuple[int, int]:
    """(root version, serial) of the policy this node holds: the order dissemination uses."""
    pol = trust.policy
    return (pol.root_version, pol.serial) if pol is not None else (0, 0)


def held_digest(trust: TrustedState) -> Digest | None:
    """The digest of the policy this node holds, if any (asked on every step of the node: one
    immutable ``Digest`` per policy, shared)."""
    h = trust.policy_hash
    if h is None:
        return None
    pol = trust.policy
    assert pol is not None
    return _digest(pol.serial, h, pol.root_version)


@functools.lru_cache(maxsize=64)
def _digest(serial: int, policy_hash: str, root_version: int) -> Digest:
    return Digest(serial, bytes.fromhex(policy_hash), root_version)


class VersionClaims:
    def __init__(self, config: GossipConfig, trust: TrustedState, dissemination: Dissemination,
                 piggyback: Piggyback, outbox: list[Effect]) -> None:
        self.cfg = config
        self.trust = trust
        self.dissemination = dissemination
        self.piggyback = piggyback
        self.outbox = outbox
        self._root_asked: dict[str, int] = {}  # peer -> when we last asked it for roots

    def ask_roots(self, peer: str, now_ms: int) -> None:
        """Ask ``peer`` for the roots after ours (a policy it sent needs a newer root)."""
        self._root_asked[peer] = now_ms
        self.outbox.append(self.piggyback.send(peer, RootPull(self.trust.root_version)))

    def on_root_claim(self, peer: str, version: int, now_ms: int) -> None:
        """A peer claims a newer root: ask it (rate-limited per peer, so one peer inflating its root
        version cannot use up the asks meant for the others)."""
        if version <= self.trust.root_version:
            return
        last = self._root_asked.get(peer)
        if last is not None and now_ms - last < self.cfg.pull_timeout_ms:
            return
        if len(self._root_asked) >= MAX_ROOT_ASKS_TRACKED:
            self._root_asked.clear()
        self.ask_roots(peer, now_ms)

    def on_serial_claim(self, peer: str, serial: int, root_version: int, now_ms: int) -> None:
        """Probes carry the sender's (root version, serial): a node that missed every announce catches
        up here."""
        if not serial:
            return
        hint = Digest(serial, b"", root_version)
        if hint.key > held_key(self.trust):
            if root_version > self.trust.root_version:
                self.on_root_claim(peer, root_version, now_ms)
            self.dissemination.offer(peer, hint, now_ms, self.cfg.graft_delay_ms)
        else:
            self.dissemination.note_has(peer, hint.key)

    def on_digest(self, peer: str, digest: Digest | None, reply: bool, now_ms: int, announce: bool = True) -> None:
        """An announce or a sync: ``reply`` whether to tell the peer about ours when it is behind; a newer
        version named by a sync (``announce`` false) is pulled after ``graft_delay_ms`` (see
        ``Dissemination.offer``)."""
        mine = held_key(self.trust)
        if digest is None:
            if mine[1] and reply:
                d = held_digest(self.trust)
                assert d is not None
                self.dissemination.announce_to(peer, d)
            return
        if digest.key > mine:
            if digest.root_version > self.trust.root_version:
                self.on_root_claim(peer, digest.root_version, now_ms)
            self.dissemination.offer(peer, digest, now_ms, 0 if announce else self.cfg.graft_delay_ms)
        elif digest.key == mine and digest.hash and self.trust.policy_hash and \
                digest.hash.hex() != self.trust.policy_hash:
            self._other_hash(peer, digest, reply, now_ms)
        else:
            self.dissemination.note_has(peer, digest.key)
            if digest.key < mine and reply:
                d = held_digest(self.trust)
                assert d is not None
                self.dissemination.announce_to(peer, d)

    def _other_hash(self, peer: str, digest: Digest, reply: bool, now_ms: int) -> None:
        """The peer holds our version with another payload hash: a possible equivocation.  Fetch what
        we have not verified yet; a lower hash would replace ours (every node converges on the lowest),
        a higher one is refused after verification (and we tell the peer about ours)."""
        mine = self.trust.policy_hash or ""
        theirs = digest.hash.hex()
        known = self.trust.knows_equivocating(digest.serial, theirs)
        if theirs < mine or not known:
            self.dissemination.offer(peer, digest, now_ms)
        if theirs > mine and known and reply:
            d = held_digest(self.trust)
            assert d is not None
            self.dissemination.announce_to(peer, d, force=True)
