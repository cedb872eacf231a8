"""The gossip node façade: ``handle(now, input) -> list[effect]`` and ``next_deadline()``.

Sans-IO and deterministic: time comes in ``now`` (monotonic ms + wall seconds), randomness through the
injected ``entropy``, bytes in ``FrameReceived``; everything the node wants done comes back as effects.
The daemon (meshnode/) and the simulator (simulations/) drive this same class.

The node decodes a frame, hands it to the part that owns its message and returns what the parts put
in the one ordered ``outbox``; its deadline is the earliest of theirs.  The parts: ``membership``
(member table, SWIM, anti-entropy), ``dissemination`` (announce and pull of policy bodies),
``claims`` (what a peer's claimed version means), ``acceptance`` (verifying policies and roots,
serving pulls), ``enforcement`` (enforced vs trusted, our signed status), ``directory`` (the members
handed to enforcement, the members file) and ``offences`` (blaming and charging peers).

Bootstrapping by address: at start a node knows seed addresses only.  It sends ``Send(peer="",
address=seed, data=Sync(record=own signed record))``: "dial this address, whoever it is".  The shell
learns the peer's node_id from the certificate it authenticated with, reports ``PeerConnected`` and
delivers replies as ``FrameReceived(peer=node_id)``.  The seed answers with its own record and the
directory digest, and push-pull anti-entropy fills in the rest.  A seed address that is our own
advertised address is skipped.

Ordering: within one returned list, ``PersistPolicy`` and ``Enforce`` of a new policy precede every
``Send`` that announces it, so the shell can execute the list in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from protocol.entropy import Entropy
from protocol.errors import FormatError, LocalProtocolError, RemoteProtocolError, SignatureError, TrustError
from protocol.gossip.acceptance import PolicyAcceptance
from protocol.gossip.conduct import PeerConduct
from protocol.gossip.config import GossipConfig
from protocol.gossip.connected_peers import ConnectedPeers
from protocol.gossip.directory import MemberDirectory
from protocol.gossip.dissemination import Dissemination
from protocol.gossip.enforcement_status import EnforcementStatus
from protocol.gossip.events import (
    Alert,
    Disconnect,
    Effect,
    Enforce,
    FrameReceived,
    LeaveRequested,
    LivenessChanged,
    MemberEntry,
    Now,
    PeerConnected,
    PeerDisconnected,
    PersistMembers,
    PersistPolicy,
    PersistRoot,
    PolicyResult,
    PolicySubmitted,
    RootsSubmitted,
    RulesetApplied,
    Send,
    SendFailed,
    TimerFired,
    ValidationReported,
    Verdict,
)
from protocol.gossip.member_table import LIVENESS_NAME
from protocol.gossip.members import VerifyCache
from protocol.gossip.membership import Membership
from protocol.gossip.offences import PeerOffences
from protocol.gossip.status_view import status_view
from protocol.gossip.version_claims import VersionClaims, held_digest
from protocol.gossip.wire import (
    Ack,
    Announce,
    Digest,
    MemberPull,
    Members,
    Nack,
    Ping,
    PingReq,
    PolicyPull,
    PolicyPush,
    RootPull,
    RootPush,
    Sync,
    SyncEntries,
    decode,
)
from protocol.trust.metadata import Certificate
from protocol.trust.signing import public_key_of
from protocol.trust.state import TrustedState

__all__ = [
    "Alert", "Disconnect", "Effect", "Enforce", "FrameReceived", "GossipConfig", "LeaveRequested",
    "LivenessChanged", "MemberEntry", "Node", "Now", "PeerConnected", "PeerDisconnected", "PersistMembers",
    "PersistPolicy", "PersistRoot", "PolicyResult", "PolicySubmitted", "RootsSubmitted", "RulesetApplied",
    "Send", "SendFailed", "TimerFired", "ValidationReported", "Verdict", "VerifyCache",
]

class Node:
    def __init__(
        self,
        config: GossipConfig,
        trust: TrustedState,
        node_id: str,
        cert_bytes: bytes,
        identity_seed: bytes,
        advertise: str,
        seeds: list[str],
        entropy: Callable[[int], bytes] | Any,
        known_members: Sequence[MemberEntry] = (),
        *,
        verify_cache: VerifyCache | None = None,
        enforced: tuple[int, str] | None = None,
    ) -> None:
        """``known_members``: the members file of the last run; ``enforced``: (serial, ruleset hash
        hex) the shell's enforcer already confirmed before the node was built (the boot apply of the
        last-known-good policy), as if by ``RulesetApplied``."""
        cert = trust.check_certificate(cert_bytes)
        if cert.node_id != node_id:
            raise LocalProtocolError(f"certificate is for {cert.node_id!r}, not {node_id!r}")
        if public_key_of(identity_seed) != cert.identity_key:
            raise LocalProtocolError("identity key does not match the certificate")
        self.cfg = config
        self.trust = trust
        self.node_id = node_id
        self.cert = cert
        self.advertise = advertise
        self.rng = Entropy(entropy)
        self.cache = verify_cache if verify_cache is not None else VerifyCache()
        self.outbox: list[Effect] = []  # what handle() returns, in order (the parts append to it too)
        self.connected = ConnectedPeers()
        self.membership = Membership(
            config, trust, node_id, identity_seed, cert, cert_bytes, advertise, self.rng, self.cache,
            connected=self.connected.__contains__, preferred=self.connected.open, outbox=self.outbox,
            seeds=[s for s in dict.fromkeys(seeds) if s and s != advertise],
            # members remembered from the last run that can be dialled (a few are tried at start)
            known_peers=[p for p in known_members if p.node_id != node_id and p.address])
        self.members = self.membership.table
        self.anti_entropy = self.membership.anti_entropy
        self.conduct = PeerConduct()
        self.dissemination = Dissemination(config, self.rng, self.membership, self.connected, self.conduct,
                                           self.outbox)
        self.directory = MemberDirectory(config, trust, self.members, self.membership.records, self.outbox,
                                         known_members)
        self.enforcement = EnforcementStatus(config, trust, self.membership.own, self.outbox, enforced)
        self.offences = PeerOffences(self.conduct, self.connected, self.dissemination, self.outbox)
        self.claims = VersionClaims(config, trust, self.dissemination, self.membership.piggyback, self.outbox)
        self.acceptance = PolicyAcceptance(config, trust, self.dissemination, self.offences, self.enforcement,
                                           self.claims, self.membership.piggyback, self.outbox)
        self.started = False
        self._now = Now(0, 0.0)
        self._house_at = 0
        self._frames = 0
        self._policies_applied = 0
        self._handlers: dict[type, Callable[[str, Any], None]] = {
            Ping: self._on_ping, Ack: self._on_ack, PingReq: self._on_ping_req, Nack: self._on_nack,
            Announce: self._on_announce, PolicyPull: self._on_policy_pull, PolicyPush: self._on_policy_push,
            RootPull: self.acceptance.serve_root_pull, RootPush: self._on_root_push, Sync: self._on_sync,
            SyncEntries: self.anti_entropy.on_sync_entries, MemberPull: self.anti_entropy.on_member_pull,
            Members: self._on_members,
        }

    @property
    def counters(self) -> dict[str, int]:
        """The node's own counters (the parts' are in ``status``)."""
        return {"remote_errors": self.offences.remote_errors, "frames": self._frames,
                "policies_applied": self._policies_applied, "stale_offers": self.acceptance.stale_offers,
                "pull_answers_refused": self.acceptance.pull_answers_refused,
                "equivocations_seen": self.enforcement.equivocations_seen}

    # -- output --------------------------------------------------------------------------------------
    def send(self, peer: str, msg: Any) -> None:
        self.outbox.append(self.membership.piggyback.send(peer, msg))

    # -- the façade ----------------------------------------------------------------------------------
    def handle(self, now: Now, inp: Any) -> list[Effect]:
        self._now = now
        if not self.started:
            self._start(now)
        if isinstance(inp, FrameReceived):
            self._on_frame(inp.peer, inp.data)
        elif isinstance(inp, TimerFired):
            pass
        elif isinstance(inp, PeerConnected):
            self._on_connected(inp.peer, inp.cert_bytes)
        elif isinstance(inp, PeerDisconnected):
            if not self.connected.closed(inp.peer):  # (closed for misbehaviour: no fresh answers)
                self.acceptance.channel_lost(inp.peer)
                self.dissemination.told.pop(inp.peer, None)
            self.dissemination.pull_failed(inp.peer, now.ms)
        elif isinstance(inp, SendFailed):
            if inp.peer:
                self.membership.swim.probe_send_failed(inp.peer, now.ms)
                self.dissemination.pull_failed(inp.peer, now.ms)
                # What we pushed or announced to it may not have arrived: it may be told and served again.
                self.dissemination.told.pop(inp.peer, None)
                self.acceptance.channel_lost(inp.peer)
        elif isinstance(inp, PolicySubmitted):
            self._accept_policy(inp.envelope, None, inp.source)
        elif isinstance(inp, RootsSubmitted):
            self._install_roots(inp.chain, None, inp.source)
        elif isinstance(inp, RulesetApplied):
            self.enforcement.on_ruleset_applied(inp, now.ms, now.wall)
        elif isinstance(inp, ValidationReported):
            self.enforcement.on_validation(inp, now.wall)
        elif isinstance(inp, LeaveRequested):
            item = self.membership.leave(now.ms)
            for peer in self.membership.pick(self.cfg.fanout + 1, lambda p: False, self.connected.__contains__):
                self.send(peer, Ping(0, peer, (item,)))
        else:
            raise LocalProtocolError(f"unknown input {type(inp).__name__}")
        self._tick(now)
        out = self.outbox[:]
        self.outbox.clear()
        return out

    def next_deadline(self) -> int | None:
        if not self.started:
            return None
        d = min(self.membership.swim.next_deadline(), self.anti_entropy.due, self._house_at)
        for extra in (self.dissemination.next_deadline(), self.directory.next_deadline(),
                      self.enforcement.next_deadline()):
            if extra is not None and extra < d:
                d = extra
        return d

    def status(self, now: Now) -> dict[str, Any]:
        """A JSON-able view: this node, its policy, every member, and cluster convergence (see
        ``protocol.gossip.status_view``)."""
        counters = {**self.counters, "misbehaviour_disconnects": self.conduct.disconnects, **self.membership.counters,
                    **self.dissemination.counters,
                    **{f"misbehaviour_{k}": v for k, v in sorted(self.conduct.counts.items())}}
        return status_view(now, self.trust, self.members, node_id=self.node_id, advertise=self.advertise,
                           incarnation=self.membership.own.incarnation, local_health=self.membership.swim.health,
                           enforced=self.enforcement.enforced, state=self.enforcement.state(self._now.wall),
                           not_enforced=self.enforcement.not_enforced, counters=counters)

    def member_summary(self) -> list[tuple[str, str, str, str]]:
        """(node id, region, liveness, advertised address) of every member, ourselves included: what the
        shell's reachability and probe checks need, without building the whole ``status`` view."""
        codes = self.members.liveness_codes
        return [(r.node_id, r.region, LIVENESS_NAME[codes[r.idx]], r.address) for r in self.members.records()]

    # -- start and timers ----------------------------------------------------------------------------
    def _start(self, now: Now) -> None:
        self.started = True
        self.membership.start(now.ms, now.wall)
        self.enforcement.publish(now.wall)
        ms = now.ms
        self.anti_entropy.start(ms)
        self._house_at = ms + self.cfg.housekeeping_interval_ms
        self.directory.start(ms)
        self.anti_entropy.join(ms, held_digest(self.trust), self.trust.root_version)

    def _tick(self, now: Now) -> None:
        ms = now.ms
        self.membership.swim.tick(ms)
        self.dissemination.tick(ms)
        anti_entropy = self.anti_entropy
        if ms >= anti_entropy.due:  # (its tick does nothing before: skip building the digest)
            anti_entropy.tick(ms, held_digest(self.trust), self.trust.root_version)
        if ms >= self._house_at:
            self._house_at = ms + self.cfg.housekeeping_interval_ms
            self._housekeeping(now)
        self.directory.tick(ms, now.wall)
        self.enforcement.check(ms, now.wall)

    def _housekeeping(self, now: Now) -> None:
        for peer in self.dissemination.cold_tree_neighbours():
            self.send(peer, Ping(0, peer))  # opens the channel a tree push will use (answered by an Ack)
        self.membership.records.expel_invalid(now.wall, revocations=False)
        self.enforcement.housekeeping(now.wall)
        skew = self.trust.skew_s
        if self.cert.not_after < now.wall + 7 * 86400 - skew:
            self.outbox.append(Alert("node.certificate_expiring", {"not_after": self.cert.not_after}))

    # -- frames --------------------------------------------------------------------------------------
    def _on_frame(self, peer: str, data: bytes) -> None:
        self._frames += 1
        self.membership.heard_from(peer, self._now.ms)
        try:
            msg = decode(data)
            handler = self._handlers[type(msg)]
            gossip = getattr(msg, "gossip", ())
            if gossip:
                self.membership.on_gossip(gossip, self._now.ms, self._now.wall)
            handler(peer, msg)
        except (RemoteProtocolError, SignatureError, FormatError) as exc:
            self.offences.blame(peer, exc, self._now.ms)

    def _on_connected(self, peer: str, cert_bytes: bytes) -> None:
        try:
            # keyed by the exact bytes (a bytes object caches its hash: the same certificate presented
            # again costs no digest) and the root they were checked against
            key = ("cert", bytes(cert_bytes), self.trust.root_version)
            hit = self.cache.get(key)
            if hit is None:
                hit = self.trust.check_certificate(cert_bytes)
                self.cache.put(key, hit)
            cert = cast(Certificate, hit)
            self.membership.records.check_cert_valid(cert, self._now.wall)
            if cert.node_id != peer:
                raise SignatureError(f"channel peer {peer!r} presented the certificate of {cert.node_id!r}")
        except TrustError as exc:
            self.offences.blame(peer, exc, self._now.ms)
            return
        self.connected.add(peer)

    def _on_ping(self, peer: str, msg: Ping) -> None:
        self.membership.swim.on_ping(peer, msg)
        self.claims.on_serial_claim(peer, msg.serial, msg.root_version, self._now.ms)

    def _on_ack(self, peer: str, msg: Ack) -> None:
        self.membership.swim.on_ack(msg, self._now.ms)
        self.claims.on_serial_claim(peer, msg.serial, msg.root_version, self._now.ms)

    def _on_ping_req(self, peer: str, msg: PingReq) -> None:
        self.membership.swim.on_ping_req(peer, msg, self._now.ms)

    def _on_nack(self, peer: str, msg: Nack) -> None:
        self.membership.swim.on_nack(msg)

    def _on_announce(self, peer: str, msg: Announce) -> None:
        self.claims.on_digest(peer, msg.digest, True, self._now.ms)

    def _on_sync(self, peer: str, msg: Sync) -> None:
        now = self._now
        self.anti_entropy.on_sync_view(msg, now.ms, now.wall)
        self.claims.on_root_claim(peer, msg.root_version, now.ms)
        self.claims.on_digest(peer, msg.digest, not msg.reply, now.ms, announce=False)
        self.anti_entropy.answer_sync(peer, msg, held_digest(self.trust), self.trust.root_version, now.ms)

    def _on_members(self, peer: str, msg: Members) -> None:
        self.anti_entropy.on_members(peer, msg, self._now.ms, self._now.wall)

    def _on_policy_pull(self, peer: str, msg: PolicyPull) -> None:
        self.acceptance.serve_policy_pull(peer, msg, self._now.ms)

    def _on_policy_push(self, peer: str, msg: PolicyPush) -> None:
        self._accept_policy(msg.envelope, peer, peer)

    def _on_root_push(self, peer: str, msg: RootPush) -> None:
        self._install_roots(list(msg.chain), peer, peer)

    # -- a new policy or root ------------------------------------------------------------------------
    def _accept_policy(self, envelope: bytes, peer: str | None, source: str) -> None:
        """Persist, enforce and announce a newly trusted policy (in that order)."""
        now = self._now
        check = self.acceptance.accept_policy(envelope, peer, source, now.ms, now.wall)
        if check is None:
            return
        pol = check.policy
        self._policies_applied += 1
        self.outbox.append(PersistPolicy(pol.serial, check.envelope_bytes))
        self.outbox.append(Enforce(pol, check.hash, self.directory.for_enforcement(now.wall)))
        self.enforcement.applying(pol.serial, check.hash)
        if check.replaces is not None:
            self.enforcement.note_equivocation(now.wall)
        if peer is None:
            self.outbox.append(PolicyResult(source, True, pol.serial, Verdict.ACCEPTED))
        else:
            self.dissemination.note_has(peer, (pol.root_version, pol.serial))
        # Revocations travel with the policy: expel now, and tell enforcement at once.
        if pol.revocations.nodes or pol.revocations.certs:
            self.membership.records.expel_invalid(now.wall)
            self.directory.emit_if_changed_now(now.wall)
        self.enforcement.check(now.ms, now.wall)
        digest = Digest(pol.serial, bytes.fromhex(check.hash), pol.root_version)
        eager = self.dissemination.on_accepted(digest, now.ms, peer, len(check.envelope_bytes))
        self.acceptance.push_policy(eager, now.ms)

    def _install_roots(self, chain: list[bytes], peer: str | None, source: str) -> None:
        """A stepped root re-checks every member and our status, then retries the body that waited."""
        now = self._now
        if not self.acceptance.install_roots(chain, peer, source, now.ms):
            return
        self.membership.on_root_changed(now.wall)
        self.enforcement.publish_if_changed(now.wall)
        pending = self.acceptance.take_pending()
        if pending is not None:
            self._accept_policy(pending, peer, source)
