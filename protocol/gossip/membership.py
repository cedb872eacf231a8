"""Membership: the parts that keep the member directory, tied together.

* ``MemberTable`` (protocol.gossip.member_table): what we believe of every member, in columns.
* ``OwnRecord`` (protocol.gossip.own_record): our signed record and status; refutation.
* ``MemberRecords`` (protocol.gossip.member_records): verifying and merging records, statuses, certificates.
* ``Swim`` (protocol.gossip.swim): failure detection (SWIM with Lifeguard).
* ``AntiEntropy`` (protocol.gossip.antientropy): push-pull sync of the directory, joining, retries.
* ``BroadcastQueue`` and ``Piggyback`` (protocol.gossip.broadcasts): member rumours riding on probes.

The parts depend one way (table <- own record <- records <- swim, anti-entropy) and never call back
into the node: what they want sent or reported goes to the shared ``outbox``, in order (the node's
own effect list, which the node returns from ``handle``).

Memory layout: see ``protocol.gossip.members`` (about 40 bytes per member per node).  Peer-controlled
memory is bounded: see ``protocol.gossip.member_records`` (records, statuses), ``protocol.gossip.swim`` (suspicion
sources, relayed probes) and ``protocol.gossip.broadcasts`` (the queue, in bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from protocol.entropy import Entropy
from protocol.errors import FormatError, RemoteProtocolError, SignatureError, TrustError
from protocol.gossip.antientropy import AntiEntropy
from protocol.gossip.broadcasts import MAX_BROADCAST_BYTES, MAX_BROADCASTS, BroadcastQueue, Piggyback
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Effect, MemberEntry
from protocol.gossip.member_base import ConvergedDirectory
from protocol.gossip.member_records import MemberRecords
from protocol.gossip.member_table import ALIVE, DEAD, LEFT, LIVENESS, SUSPECT, MemberTable
from protocol.gossip.members import (
    CACHE_ENTRY_BYTES,
    CACHE_MAX_BYTES,
    IndexedSet,
    IntSet,
    Member,
    MemberIndex,
    Rec,
    StatusInfo,
    VerifyCache,
    bucket_of,
)
from protocol.gossip.own_record import OwnRecord
from protocol.gossip.peer_selection import pick
from protocol.gossip.swim import MAX_RELAYS, MAX_RELAYS_PER_PEER, Swim
from protocol.gossip.wire import Alive, AliveRef, Dead, GossipItem, Suspect
from protocol.trust.metadata import Certificate
from protocol.trust.state import TrustedState

__all__ = [  # the parts live in their own modules; these names stay importable from here
    "ALIVE", "CACHE_ENTRY_BYTES", "CACHE_MAX_BYTES", "DEAD", "LEFT", "LIVENESS", "MAX_BROADCASTS",
    "MAX_BROADCAST_BYTES", "MAX_RELAYS", "MAX_RELAYS_PER_PEER", "SUSPECT", "BroadcastQueue", "IndexedSet",
    "IntSet", "Member", "MemberIndex", "MemberTable", "Membership", "Rec", "StatusInfo", "VerifyCache",
    "bucket_of",
]

COUNTERS = ("probes", "probe_failures", "suspicions", "deaths_declared", "refutations", "records_rejected",
            "absurd_incarnations", "incarnation_saturated", "status_unknown_member", "relays_refused",
            "sync_replies_unasked", "record_refs_learned", "record_refs_unknown_member", "record_refs_other_cert")


class Membership:
    def __init__(
        self,
        config: GossipConfig,
        trust: TrustedState,
        node_id: str,
        identity_seed: bytes,
        cert: Certificate,
        cert_bytes: bytes,
        advertise: str,
        rng: Entropy,
        cache: VerifyCache,
        *,
        connected: Callable[[str], bool] = lambda peer: False,
        preferred: IndexedSet | None = None,
        seeds: Sequence[str] = (),
        known_peers: Sequence[MemberEntry] = (),
        outbox: list[Effect] | None = None,
    ) -> None:
        """``connected``: whether a channel to a peer is open; ``preferred``: those peers (for
        uniform random choice); ``seeds``/``known_peers``: addresses to join through; ``outbox``:
        where the parts put what they want sent or reported (the node's effect list)."""
        self.cfg = config
        self.rng = rng
        self.preferred = preferred
        self.outbox: list[Effect] = outbox if outbox is not None else []  # in order
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.table = MemberTable(node_id, cert.region, cache, config.sync_buckets, self.outbox)
        self.broadcasts = BroadcastQueue()
        self.piggyback = Piggyback(config, trust, self.table, self.broadcasts)
        self.own = OwnRecord(self.table, self.broadcasts, identity_seed, cert, cert_bytes, advertise, self.counters)
        self.records = MemberRecords(trust, cache, self.table, self.own, self.broadcasts, self.counters)
        self.swim = Swim(config, rng, self.table, self.own, self.broadcasts, self.piggyback, self.outbox,
                         self.counters, connected)
        self.anti_entropy = AntiEntropy(config, rng, self.table, self.own, self.records, self.piggyback,
                                        self.outbox, seeds, known_peers)
        self.table.watch_addresses(seeds)

    def start(self, now_ms: int, wall: float) -> None:
        self.own.start(now_ms, wall)
        self.swim.start(now_ms)

    def adopt(self, base: ConvergedDirectory) -> int:
        """Start from a converged directory shared with other nodes (``MemberTable.adopt``): the node
        of a fleet that has been running.  Such a fleet holds this node's record and status already, so
        the rumours the base holds with the same signed bytes (the start announcements: our record and
        first status) are dropped from the broadcast queue instead of being gossiped
        ``retransmit_limit`` times to peers that hold them.  Returns how many were dropped.  Only the
        simulator adopts a base: a daemon (re)starting announces its new record and status."""
        self.table.adopt(base)
        of = self.table.index.of
        return self.broadcasts.drop_known(lambda node_id, item: base.holds(of.get(node_id), item))

    def next_deadline(self) -> int:
        return self.swim.next_deadline()

    def pick(self, k: int, exclude: Callable[[str], bool], prefer: Callable[[str], bool] | None = None,
             cross: int = 1) -> list[str]:
        """Up to ``k`` alive peers, region-aware (see protocol.gossip.peer_selection)."""
        return pick(self.table, self.rng, k, exclude, prefer, cross, self.preferred)

    def heard_from(self, peer: str, now_ms: int) -> None:
        """A frame arrived from ``peer``: it is up right now (only its own refutation clears a
        suspicion in the cluster, but a fresh death claim about it is downgraded to a suspicion)."""
        self.table.heard_from(peer, now_ms, 3 * self.cfg.probe_interval_ms)

    def on_gossip(self, items: Iterable[GossipItem], now_ms: int, wall: float) -> None:
        """Piggybacked rumours from a peer.  A forged or malformed one is the peer's fault (raised);
        an expired or revoked record was relayed in good faith, just not for us (counted)."""
        for item in items:
            try:
                if isinstance(item, Alive):
                    self.records.learn_record(item.record, now_ms, wall)
                elif isinstance(item, AliveRef):
                    self.records.learn_ref(item, now_ms, wall)
                elif isinstance(item, Suspect):
                    self.swim.on_suspect(item, now_ms)
                elif isinstance(item, Dead):
                    self.swim.on_dead(item, now_ms)
                else:
                    self.records.learn_status(item)
            except (SignatureError, FormatError, RemoteProtocolError):
                raise
            except TrustError:
                self.counters["records_rejected"] += 1

    def leave(self, now_ms: int) -> Alive:
        return self.own.leave(now_ms)

    def on_root_changed(self, wall: float) -> None:
        """A new root: cached verifications no longer apply; members whose certificate the new root
        does not vouch for are expelled, then expired or revoked ones."""
        self.records.on_root_changed()
        table = self.table
        for rec in list(table.records()):
            if rec.node_id == table.me:
                continue
            try:
                self.records.trust.check_certificate(rec.cert_bytes)
            except TrustError:
                table.remove(rec.node_id, "certificate_untrusted")
        self.records.expel_invalid(wall)
