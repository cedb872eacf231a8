"""The candidate versions peers claim to hold, and who claims them (see ``protocol.gossip.dissemination``).

A claim is a bounded hint: each peer backs at most one candidate (a newer claim replaces its older
one), a claim lives ``CLAIM_TTL_MS`` unless the peer repeats it, and at most ``MAX_CLAIMS``
candidates are kept (the one with the fewest sources, then the highest version, is evicted: a lie is
usually absurdly high).  A candidate is ``(key, payload hash)``; a probe names a serial only (hash
``b""``), and a full digest of the same version upgrades it.  The book only keeps the ledger;
dissemination decides what to pull and from whom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.gossip.wire import Digest

Key = tuple[int, int]  # Digest.key: (root version, serial)
ClaimId = tuple[Key, bytes]  # (key, payload hash); hash b"" = learned from a probe (serial only)
MAX_CLAIMS = 32  # candidate versions held at once (each peer backs at most one)
CLAIM_TTL_MS = 15_000  # a claim the peer does not repeat is forgotten (probes repeat it every second)


@dataclass(slots=True)
class Pull:
    peer: str
    deadline_ms: int


@dataclass(slots=True)
class Claim:
    digest: Digest
    sources: dict[str, int] = field(default_factory=dict)  # peer -> claim expiry (ms)
    tried: dict[str, int] = field(default_factory=dict)  # peer -> when we last pulled this from it
    pull: Pull | None = None
    not_before: int = 0  # no pull before this time (a probe's or sync's claim waits for the tree)


class ClaimBook:
    __slots__ = ("claims", "claim_of", "counters")

    def __init__(self, counters: dict[str, int]) -> None:
        self.claims: dict[ClaimId, Claim] = {}
        self.claim_of: dict[str, ClaimId] = {}  # peer -> its one live claim
        self.counters = counters  # (dissemination's: claims_evicted)

    def id_for(self, digest: Digest) -> ClaimId:
        """The candidate a claim of ``digest`` backs (a full digest upgrades a serial-only one)."""
        key = digest.key
        if digest.hash:
            hint = self.claims.pop((key, b""), None)  # a full digest upgrades a probe's serial-only claim
            if hint is not None:
                hint.digest = digest
                cid = (key, digest.hash)
                if cid in self.claims:
                    self._merge(self.claims[cid], hint)
                else:
                    self.claims[cid] = hint
                for p, c in list(self.claim_of.items()):
                    if c == (key, b""):
                        self.claim_of[p] = cid
            return (key, digest.hash)
        # A probe names no hash: back the candidate we would converge on at that version, if any.
        hashed = sorted(h for (k, h) in self.claims if k == key and h)
        return (key, hashed[0]) if hashed else (key, b"")

    @staticmethod
    def _merge(into: Claim, other: Claim) -> None:
        for p, exp in other.sources.items():
            into.sources[p] = max(exp, into.sources.get(p, 0))
        for p, t in other.tried.items():
            into.tried[p] = max(t, into.tried.get(p, t))
        if into.pull is None:
            into.pull = other.pull

    def make_room(self, digest: Digest) -> bool:
        """Keep at most MAX_CLAIMS candidates: evict the one with the fewest sources, then the highest
        version (a lie is usually absurdly high); refuse the newcomer if it would be that one."""
        if len(self.claims) < MAX_CLAIMS:
            return True

        def badness(cid: ClaimId, c: Claim) -> tuple[int, Key, bytes]:
            return (-len(c.sources), cid[0], cid[1])

        worst = max(self.claims, key=lambda cid: badness(cid, self.claims[cid]))
        self.counters["claims_evicted"] += 1
        if badness(worst, self.claims[worst]) < (-1, digest.key, digest.hash):
            return False
        self.drop(worst)
        return True

    def drop_source(self, peer: str, cid: ClaimId) -> None:
        claim = self.claims.get(cid)
        if self.claim_of.get(peer) == cid:
            del self.claim_of[peer]
        if claim is None:
            return
        claim.sources.pop(peer, None)
        if not claim.sources and claim.pull is None:
            del self.claims[cid]

    def drop(self, cid: ClaimId) -> None:
        claim = self.claims.pop(cid, None)
        if claim is None:
            return
        for p in claim.sources:
            if self.claim_of.get(p) == cid:
                del self.claim_of[p]

    def forget_source(self, peer: str) -> None:
        cid = self.claim_of.get(peer)
        if cid is not None:
            self.drop_source(peer, cid)

    def done(self, key: Key, digest_hash: bytes = b"") -> None:
        """We hold ``key`` (with ``digest_hash``): every candidate at or below it is settled, except
        other hashes at exactly that version (equivocations the node still has to fetch and verify)."""
        for cid in [c for c in self.claims if c[0] < key or (c[0] == key and c[1] in (digest_hash, b""))]:
            self.drop(cid)

    def drop_candidate(self, key: Key, digest_hash: bytes) -> None:
        self.drop((key, digest_hash))

    @property
    def wanted(self) -> list[Digest]:
        return [c.digest for _, c in sorted(self.claims.items())]
