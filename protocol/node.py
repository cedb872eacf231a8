"""The gossip node façade: ``handle(now, input) -> list[effect]`` and ``next_deadline()``.

Sans-IO and deterministic: time comes in ``now`` (monotonic ms + wall seconds), randomness through the
injected ``entropy``, bytes in ``FrameReceived``; everything the node wants done comes back as effects.
The daemon (meshnode/) and the simulator (simulations/) drive this same class.

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

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, cast

from .conduct import PeerConduct
from .connected_peers import ConnectedPeers
from .dissemination import Dissemination
from .entropy import Entropy
from .errors import (
    EquivocationError,
    ExpiredError,
    FormatError,
    LocalProtocolError,
    NotYetValidError,
    RemoteProtocolError,
    RevokedError,
    RollbackError,
    RootMismatchError,
    SignatureError,
    TrustError,
)
from .gossip_config import GossipConfig
from .gossip_events import (
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
    Verdict,
)
from .gossip_wire import (
    HASH_PREFIX,
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
from .members import VerifyCache
from .membership import Membership
from .metadata import Certificate, decode_policy, payload_hash
from .signing import decode_envelope, public_key_of
from .status_view import status_view
from .trust import Equivocation, TrustedState

__all__ = [
    "Alert", "Disconnect", "Effect", "Enforce", "FrameReceived", "GossipConfig", "LeaveRequested",
    "LivenessChanged", "MemberEntry", "Node", "Now", "PeerConnected", "PeerDisconnected", "PersistMembers",
    "PersistPolicy", "PersistRoot", "PolicyResult", "PolicySubmitted", "RootsSubmitted", "RulesetApplied",
    "Send", "SendFailed", "TimerFired", "Verdict", "VerifyCache",
]

PULL_REPEATS_TOLERATED = 2  # refused repeats of one pull before it counts as a flood
MAX_PULL_ANSWERS_TRACKED = 4096  # (peer -> version last served) entries; channels are bounded anyway


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
        """``enforced``: (serial, ruleset hash hex) the shell's enforcer already confirmed before the
        node was built (the boot apply of the last-known-good policy), as if by ``RulesetApplied``."""
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
        # Certificates remembered from the last run: the directory handed to enforcement after a
        # restart is the one from before it, until members are heard from again.
        self._known_certs: dict[str, tuple[bytes, Certificate]] = {}
        for p in known_members:
            try:
                c = trust.check_certificate(p.cert)
            except (TrustError, RemoteProtocolError):
                continue
            if c.node_id == p.node_id:
                self._known_certs[c.node_id] = (p.cert, c)
        self.started = False
        self._now = Now(0, 0.0)
        self._house_at = 0
        self._dir_at: int | None = None
        self._peers_at: int | None = None
        self._last_dir: dict[str, Certificate] | None = None  # the directory last handed to Enforce
        self._last_dir_fingerprint = 0  # ... and a digest of its certificates' exact bytes
        self._pending_policy: bytes | None = None
        self._root_pull_from: dict[str, int] = {}  # peer -> when we last asked it for roots
        # What the enforcer confirmed: (serial, policy hash hex, ruleset hash prefix).  Status reports
        # this, not what we trust; trusted != enforced for longer than enforce_grace_ms is an alert.
        self._enforced: tuple[int, str, bytes] = (0, "", b"")
        self._applying: tuple[int, str] = (0, "")  # the policy of our latest Enforce (serial, hash)
        self._lag_since: int | None = None
        self._lag_alerted = False
        self._equivocation_alerted: Equivocation | None = None
        # peer -> [version, when, repeats refused] of the last body served to it (lost with the channel)
        self._served: dict[str, list[Any]] = {}
        if enforced is not None and enforced[0]:
            h = trust.policy_hash if enforced[0] == trust.serial and trust.policy_hash else ""
            self._enforced = (enforced[0], h, _prefix(enforced[1]))
        self._status_state = ""
        self._stale_alerted = False
        self.counters: dict[str, int] = {"remote_errors": 0, "frames": 0, "policies_applied": 0,
                                         "stale_offers": 0, "pull_answers_refused": 0,
                                         "equivocations_seen": 0}
        self._handlers: dict[type, Callable[[str, Any], None]] = {
            Ping: self._on_ping, Ack: self._on_ack, PingReq: self._on_ping_req, Nack: self._on_nack,
            Announce: self._on_announce, PolicyPull: self._on_policy_pull, PolicyPush: self._on_policy_push,
            RootPull: self._on_root_pull, RootPush: self._on_root_push, Sync: self._on_sync,
            SyncEntries: self.anti_entropy.on_sync_entries, MemberPull: self.anti_entropy.on_member_pull,
            Members: self._on_members,
        }

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
                self._served.pop(inp.peer, None)  # what we sent may have been lost with the channel
            self.dissemination.pull_failed(inp.peer, now.ms)
        elif isinstance(inp, SendFailed):
            if inp.peer:
                self.membership.swim.probe_send_failed(inp.peer, now.ms)
                self.dissemination.pull_failed(inp.peer, now.ms)
        elif isinstance(inp, PolicySubmitted):
            self._accept_policy(inp.envelope, None, inp.source)
        elif isinstance(inp, RootsSubmitted):
            self._roots_submitted(inp.chain, inp.source)
        elif isinstance(inp, RulesetApplied):
            self._on_ruleset_applied(inp)
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
        d = min(self.membership.next_deadline(), self.anti_entropy.next_deadline(), self._house_at)
        dd = self.dissemination.next_deadline()
        if dd is not None and dd < d:
            d = dd
        lag = self._lag_since + self.cfg.enforce_grace_ms if self._lag_since is not None and \
            not self._lag_alerted else None
        for extra in (self._dir_at, self._peers_at, lag):
            if extra is not None and extra < d:
                d = extra
        return d

    # -- start and timers ----------------------------------------------------------------------------
    def _start(self, now: Now) -> None:
        self.started = True
        self.membership.start(now.ms, now.wall)
        self._publish_status(force=True)
        ms = now.ms
        self.anti_entropy.start(ms)
        self._house_at = ms + self.cfg.housekeeping_interval_ms
        self._dir_at = ms
        self.anti_entropy.join(ms, self._digest(), self.trust.root_version)

    def _tick(self, now: Now) -> None:
        ms = now.ms
        self.membership.swim.tick(ms)
        self.dissemination.tick(ms)
        self.anti_entropy.tick(ms, self._digest(), self.trust.root_version)
        if ms >= self._house_at:
            self._house_at = ms + self.cfg.housekeeping_interval_ms
            self._housekeeping(now)
        if self.members.directory_dirty and self._dir_at is None:
            self._dir_at = ms + self.cfg.directory_debounce_for(len(self.members))
        if self._dir_at is not None and ms >= self._dir_at:
            self._dir_at = None
            self._emit_directory()
        if self.members.peers_dirty and self._peers_at is None:
            self._peers_at = ms + self.cfg.peers_persist_interval_ms
        if self._peers_at is not None and ms >= self._peers_at:
            self._peers_at = None
            self._persist_members()
        self._check_enforced(ms)

    def _persist_members(self) -> None:
        self.members.peers_dirty = False
        self._peers_at = None
        entries = self.members.member_entries()
        for nid, (cb, c) in self._known_certs.items():
            if nid not in self.members:
                entries.append(MemberEntry(nid, "", c.region, cb))
        self.outbox.append(PersistMembers(tuple(entries)))

    def _housekeeping(self, now: Now) -> None:
        self.membership.records.expel_invalid(now.wall, revocations=False)
        state = self._state_now()
        if state != self._status_state:
            if state == "stale" and not self._stale_alerted:
                self._stale_alerted = True
                self.outbox.append(Alert("policy.stale", {"serial": self.trust.serial}))
            self._publish_status(force=True)
        skew = self.trust.skew_s
        if self.cert.not_after < now.wall + 7 * 86400 - skew:
            self.outbox.append(Alert("node.certificate_expiring", {"not_after": self.cert.not_after}))

    def _current_directory(self) -> tuple[dict[str, Certificate], int]:
        """The valid certificate directory (members, then certificates remembered from the last run
        that are still valid), and a digest of the certificates' exact bytes."""
        certs, fingerprint = self.members.certs()
        if self._known_certs:
            wall = self._now.wall
            for nid, (cb, c) in list(self._known_certs.items()):
                if nid in certs:
                    continue
                try:
                    self.membership.records.check_cert_valid(c, wall)
                except TrustError:
                    del self._known_certs[nid]
                    continue
                certs[nid] = c
                fingerprint += hash(cb)
        return certs, fingerprint

    def _emit_directory(self) -> None:
        self.members.directory_dirty = False
        certs, fingerprint = self._current_directory()
        if certs != self._last_dir or fingerprint != self._last_dir_fingerprint:
            self._last_dir, self._last_dir_fingerprint = certs, fingerprint
            # the directory is durable before enforcement acts on it (restart path)
            self._persist_members()
            pol, h = self.trust.policy, self.trust.policy_hash
            if pol is not None and h is not None:
                self.outbox.append(Enforce(pol, h, certs))  # shared with _last_dir: nobody mutates it

    # -- status --------------------------------------------------------------------------------------
    def _digest(self) -> Digest | None:
        h = self.trust.policy_hash
        if h is None:
            return None
        pol = self.trust.policy
        assert pol is not None
        return Digest(pol.serial, bytes.fromhex(h), pol.root_version)

    def _state_now(self) -> str:
        """``none``/``fresh``/``stale`` (trust.policy_state), or ``not_enforced``: trusted but not
        confirmed by the enforcer for longer than the grace period."""
        return "not_enforced" if self._lag_alerted else self.trust.policy_state(self._now.wall)

    def _publish_status(self, force: bool = False) -> None:
        state = self._state_now()
        h = self.trust.policy_hash
        e_serial, e_hash, e_rules = self._enforced
        self._status_state = state
        eq = self.trust.equivocation
        self.membership.own.sign_status(e_serial, bytes.fromhex(e_hash) if e_hash else b"", e_rules, state, self._now.wall,
                             trusted=(self.trust.serial, bytes.fromhex(h) if h else b""),
                             equivocation=(eq.serial, tuple(bytes.fromhex(x) for x in eq.hashes)) if eq else (0, ()))

    def _on_ruleset_applied(self, inp: RulesetApplied) -> None:
        """The enforcer confirmed what the kernel now enforces (whatever we trust meanwhile)."""
        ph = inp.policy_hash
        if not ph:
            if self._applying[0] == inp.serial:
                ph = self._applying[1]
            elif inp.serial == self.trust.serial:
                ph = self.trust.policy_hash or ""
        try:
            rh = bytes.fromhex(inp.ruleset_hash)[:HASH_PREFIX]
            bytes.fromhex(ph)
        except ValueError:
            raise LocalProtocolError("ruleset_hash and policy_hash must be hex") from None
        self._enforced = (inp.serial, ph, rh)
        self._check_enforced(self._now.ms)
        self._publish_status(force=True)

    def _check_enforced(self, ms: int) -> None:
        """Trusted-but-not-enforced is its own state: alert after the grace period, resolve when the
        enforcer catches up."""
        serial, h = self.trust.serial, self.trust.policy_hash or ""
        if not serial or (self._enforced[0] == serial and self._enforced[1] == h):
            self._lag_since = None
            if self._lag_alerted:
                self._lag_alerted = False
                self.outbox.append(Alert("policy.not_enforced.resolved", {"serial": serial, "hash": h}))
                self._publish_status(force=True)
            return
        if self._lag_since is None:
            self._lag_since = ms
        elif not self._lag_alerted and ms - self._lag_since >= self.cfg.enforce_grace_ms:
            self._lag_alerted = True
            e_serial, e_hash, _ = self._enforced
            self.outbox.append(Alert("policy.not_enforced", {
                "trusted_serial": serial, "trusted_hash": h, "enforced_serial": e_serial,
                "enforced_hash": e_hash, "for_ms": ms - self._lag_since}))
            self._publish_status(force=True)

    # -- sync (push-pull anti-entropy) ---------------------------------------------------------------
    def _on_sync(self, peer: str, msg: Sync) -> None:
        now = self._now
        self.anti_entropy.on_sync_view(msg, now.ms, now.wall)
        self._compare_root(peer, msg.root_version)
        self._compare_digest(peer, msg.digest, reply=not msg.reply)
        self.anti_entropy.answer_sync(peer, msg, self._digest(), self.trust.root_version)

    def _on_members(self, peer: str, msg: Members) -> None:
        self.anti_entropy.on_members(msg, self._now.ms, self._now.wall)

    def _compare_root(self, peer: str, version: int) -> None:
        """A peer claims a newer root: ask it (rate-limited per peer, so one peer inflating its root
        version cannot use up the asks meant for the others)."""
        if version <= self.trust.root_version:
            return
        last = self._root_pull_from.get(peer)
        if last is not None and self._now.ms - last < self.cfg.pull_timeout_ms:
            return
        if len(self._root_pull_from) >= MAX_PULL_ANSWERS_TRACKED:
            self._root_pull_from.clear()
        self._root_pull_from[peer] = self._now.ms
        self.send(peer, RootPull(self.trust.root_version))

    def _my_key(self) -> tuple[int, int]:
        """(root version, serial) of the policy this node holds: the order dissemination uses."""
        pol = self.trust.policy
        return (pol.root_version, pol.serial) if pol is not None else (0, 0)

    def _compare_digest(self, peer: str, digest: Digest | None, reply: bool) -> None:
        mine = self._my_key()
        if digest is None:
            if mine[1] and reply:
                d = self._digest()
                assert d is not None
                self.dissemination.announce_to(peer, d)
            return
        if digest.key > mine:
            if digest.root_version > self.trust.root_version:
                self._compare_root(peer, digest.root_version)
            self.dissemination.offer(peer, digest, self._now.ms)
        elif digest.key == mine and digest.hash and self.trust.policy_hash and \
                digest.hash.hex() != self.trust.policy_hash:
            self._other_hash(peer, digest, reply)
        else:
            self.dissemination.note_has(peer, digest.key)
            if digest.key < mine and reply:
                d = self._digest()
                assert d is not None
                self.dissemination.announce_to(peer, d)

    # -- frames --------------------------------------------------------------------------------------
    def _on_frame(self, peer: str, data: bytes) -> None:
        self.counters["frames"] += 1
        self.membership.heard_from(peer, self._now.ms)
        try:
            msg = decode(data)
            handler = self._handlers[type(msg)]
            gossip = getattr(msg, "gossip", ())
            if gossip:
                self.membership.on_gossip(gossip, self._now.ms, self._now.wall)
            handler(peer, msg)
        except (RemoteProtocolError, SignatureError, FormatError) as exc:
            self._blame(peer, exc)

    def _blame(self, peer: str, exc: Exception) -> None:
        self.counters["remote_errors"] += 1
        reason = getattr(exc, "reason", "protocol_error") if isinstance(exc, TrustError) else "protocol_error"
        self.outbox.append(Alert("gossip.remote_error", {"peer": peer, "reason": reason, "error": str(exc)[:200]}))
        if peer:
            self.outbox.append(Disconnect(peer, reason))
            self.connected.discard(peer)
            self.dissemination.forget_source(peer)
            self.dissemination.pull_failed(peer, self._now.ms)

    def _on_connected(self, peer: str, cert_bytes: bytes) -> None:
        try:
            key = (hashlib.sha256(cert_bytes).digest(), self.trust.root_version, "cert")
            hit = self.cache.get(key)
            if hit is None:
                hit = self.trust.check_certificate(cert_bytes)
                self.cache.put(key, hit)
            cert = cast(Certificate, hit)
            self.membership.records.check_cert_valid(cert, self._now.wall)
            if cert.node_id != peer:
                raise SignatureError(f"channel peer {peer!r} presented the certificate of {cert.node_id!r}")
        except TrustError as exc:
            self._blame(peer, exc)
            return
        self.connected.add(peer)

    def _on_ping(self, peer: str, msg: Ping) -> None:
        self.membership.swim.on_ping(peer, msg)
        self._peer_serial(peer, msg.serial, msg.root_version)

    def _on_ack(self, peer: str, msg: Ack) -> None:
        self.membership.swim.on_ack(msg, self._now.ms)
        self._peer_serial(peer, msg.serial, msg.root_version)

    def _other_hash(self, peer: str, digest: Digest, reply: bool) -> None:
        """The peer holds our version with another payload hash: a possible equivocation.  Fetch what
        we have not verified yet; a lower hash would replace ours (every node converges on the lowest),
        a higher one is refused after verification (and we tell the peer about ours)."""
        mine = self.trust.policy_hash or ""
        theirs = digest.hash.hex()
        known = self.trust.knows_equivocating(digest.serial, theirs)
        if theirs < mine or not known:
            self.dissemination.offer(peer, digest, self._now.ms)
        if theirs > mine and known and reply:
            d = self._digest()
            assert d is not None
            self.dissemination.announce_to(peer, d, force=True)

    def _peer_serial(self, peer: str, serial: int, root_version: int) -> None:
        """Probes carry the sender's (root version, serial): a node that missed every announce catches
        up here."""
        if not serial:
            return
        hint = Digest(serial, b"", root_version)
        if hint.key > self._my_key():
            if root_version > self.trust.root_version:
                self._compare_root(peer, root_version)
            self.dissemination.offer(peer, hint, self._now.ms)
        else:
            self.dissemination.note_has(peer, hint.key)

    def _on_ping_req(self, peer: str, msg: PingReq) -> None:
        self.membership.swim.on_ping_req(peer, msg, self._now.ms)

    def _on_nack(self, peer: str, msg: Nack) -> None:
        self.membership.swim.on_nack(msg)

    def _on_announce(self, peer: str, msg: Announce) -> None:
        self._compare_digest(peer, msg.digest, reply=True)

    # -- policy --------------------------------------------------------------------------------------
    def _on_policy_pull(self, peer: str, msg: PolicyPull) -> None:
        """Serve our body at most once per (peer, version) within ``pull_answer_window_ms`` (again
        after the channel broke): a body crosses a link once per version, however often it is asked."""
        env = self.trust.policy_bytes
        if env is None or self.trust.serial < msg.serial:
            return
        rv, serial = self._my_key()
        version = (rv, serial, self.trust.policy_hash or "")
        now_ms = self._now.ms
        last = self._served.get(peer)
        if last is not None and last[0] == version and now_ms - last[1] < self.cfg.pull_answer_window_ms:
            self.counters["pull_answers_refused"] += 1
            last[2] += 1
            if last[2] > PULL_REPEATS_TOLERATED:  # an honest puller asks again only when it lost track
                self._misbehaved(peer, "pull_flood", {"serial": serial})
            return
        if last is None and len(self._served) >= MAX_PULL_ANSWERS_TRACKED:
            self._served.clear()
        self._served[peer] = [version, now_ms, 0]
        self.dissemination.note_has(peer, (rv, serial))
        self.dissemination.counters["bodies_served"] += 1
        self.send(peer, PolicyPush(env))

    def _on_policy_push(self, peer: str, msg: PolicyPush) -> None:
        self._accept_policy(msg.envelope, peer, peer)

    def _peek_serial(self, envelope: bytes) -> int | None:
        peek = self._peek(envelope)
        return peek[0] if peek is not None else None

    @staticmethod
    def _peek(envelope: bytes) -> tuple[int, str, int] | None:
        """(serial, payload hash, root version) a body claims, unverified: only to skip work and to
        tell whether it answers a pull, never to trust."""
        try:
            payload = decode_envelope(envelope, "policy").payload
            pv = decode_policy(payload)
            return pv.serial, payload_hash(payload), pv.root_version
        except (FormatError, TrustError):
            return None

    def _misbehaved(self, peer: str, kind: str, facts: dict[str, Any]) -> None:
        """Charge one offence to ``peer``: one alert per (peer, kind) episode, and the channel is
        closed when it repeats (see protocol.conduct)."""
        effects = self.conduct.charge(peer, kind, facts, self._now.ms, self.connected)
        self.outbox += effects
        if any(isinstance(e, Disconnect) for e in effects):
            self.dissemination.forget_source(peer)

    def _note_equivocation(self) -> None:
        """Alert once per equivocation (serial and set of hashes) and put it in our signed status."""
        eq = self.trust.equivocation
        if eq is None or eq == self._equivocation_alerted:
            return
        self._equivocation_alerted = eq
        self.counters["equivocations_seen"] += 1
        self.outbox.append(Alert("policy.equivocation", {
            "serial": eq.serial, "root_version": eq.root_version, "hashes": list(eq.hashes),
            "kept": eq.hashes[0]}))
        self._publish_status(force=True)

    def _accept_policy(self, envelope: bytes, peer: str | None, source: str) -> None:
        now = self._now
        local = peer is None
        if peer is not None:
            # Cheap pre-filter against the trusted floor only (never against a claim): a body we
            # already hold, or one below the floor, costs no signature check.
            peek = self._peek(envelope)
            if peek is not None:  # a pull of something newer answered with something older is unserved
                self.dissemination.body_from(peer, (peek[2], peek[0]), bytes.fromhex(peek[1]), now.ms)
            floor = self.trust.serial_floor  # the serial itself, except after a policy-key rotation
            if peek is not None and peek[0] == floor == self.trust.serial:
                if peek[1] == self.trust.policy_hash:
                    self.dissemination.note_has(peer, self._my_key())  # a duplicate: nothing to verify
                    return
                if self.trust.knows_equivocating(peek[0], peek[1]):
                    # verified and refused before: not again
                    self.dissemination.drop_candidate(self._my_key(), bytes.fromhex(peek[1]))
                    return
            if peek is not None and peek[0] < floor:
                self.counters["stale_offers"] += 1
                self.dissemination.forget_source(peer)
                self.dissemination.pull_failed(peer, now.ms, unserved=True)
                self._misbehaved(peer, "stale_offer", {"serial": peek[0], "trusted_serial": self.trust.serial})
                return
        try:
            check = self.trust.accept_policy(envelope, now.wall)
        except RootMismatchError as exc:
            if exc.needed_version and exc.needed_version > self.trust.root_version and peer is not None:
                self._pending_policy = envelope
                self._root_pull_from[peer] = now.ms
                self.send(peer, RootPull(self.trust.root_version))
            if local:
                self.outbox.append(_refused(source, self._peek_serial(envelope) or 0, exc))
            return
        except (SignatureError, FormatError) as exc:
            if local:
                self.outbox.append(_refused(source, 0, exc))
                self.outbox.append(Alert("policy.rejected", {"source": source, "reason": exc.reason, "error": str(exc)}))
            else:
                assert peer is not None
                self._blame(peer, exc)
            return
        except EquivocationError as exc:
            # A validly signed second payload at our serial with a higher hash: refused, remembered.
            self._note_equivocation()
            if local:
                self.outbox.append(_refused(source, self._peek_serial(envelope) or 0, exc))
            elif peer is not None:
                peek = self._peek(envelope)
                if peek is not None:
                    self.dissemination.drop_candidate(self._my_key(), bytes.fromhex(peek[1]))
            return
        except (RollbackError, ExpiredError, NotYetValidError, RevokedError, TrustError) as exc:
            event = {"rollback": "policy.rollback_attempt"}.get(exc.reason, "policy.rejected")
            self.outbox.append(Alert(event, {"source": source, "reason": exc.reason, "error": str(exc)}))
            if local:
                self.outbox.append(_refused(source, self._peek_serial(envelope) or 0, exc))
            elif peer is not None:
                self.dissemination.forget_source(peer)
                self.dissemination.pull_failed(peer, now.ms, unserved=True)
            return
        pol = check.policy
        if check.duplicate:
            if local:
                self.outbox.append(PolicyResult(source, True, pol.serial, Verdict.DUPLICATE))
            if peer is not None:
                self.dissemination.note_has(peer, (pol.root_version, pol.serial))
            self.dissemination.done((pol.root_version, pol.serial), bytes.fromhex(check.hash))
            return
        self.counters["policies_applied"] += 1
        self._pending_policy = None
        self.outbox.append(PersistPolicy(pol.serial, check.envelope_bytes))
        members = self._last_dir if self._last_dir is not None else self._current_directory()[0]
        self.outbox.append(Enforce(pol, check.hash, members))
        self._applying = (pol.serial, check.hash)
        if check.replaces is not None:
            self._note_equivocation()
        if local:
            self.outbox.append(PolicyResult(source, True, pol.serial, Verdict.ACCEPTED))
        if peer is not None:
            self.dissemination.note_has(peer, (pol.root_version, pol.serial))
        # Revocations travel with the policy: expel now, and tell enforcement at once.
        if pol.revocations.nodes or pol.revocations.certs:
            self.membership.records.expel_invalid(now.wall)
            if self.members.directory_dirty:
                self._dir_at = None
                self._emit_directory()
        self._check_enforced(now.ms)
        self.dissemination.on_accepted(Digest(pol.serial, bytes.fromhex(check.hash), pol.root_version), now.ms)

    # -- roots ---------------------------------------------------------------------------------------
    def _on_root_pull(self, peer: str, msg: RootPull) -> None:
        cur = self.trust.root_version
        chain = [self.trust.root_bytes(v) for v in range(max(msg.have_version + 1, 1), cur + 1)]
        roots = tuple(b for b in chain if b is not None)
        if roots:
            self.send(peer, RootPush(roots))

    def _on_root_push(self, peer: str, msg: RootPush) -> None:
        self._install_roots(list(msg.chain), peer, peer)

    def _roots_submitted(self, chain: list[bytes], source: str) -> None:
        self._install_roots(chain, None, source)

    def _install_roots(self, chain: list[bytes], peer: str | None, source: str) -> None:
        before = self.trust.root_version
        added: list[tuple[int, bytes]] = []
        try:
            for data in chain:
                if self.trust.update_root(data):
                    added.append((self.trust.root_version, data))
        except RootMismatchError:
            pass  # a gap: keep what stepped in order
        except TrustError as exc:
            if peer is not None and isinstance(exc, (SignatureError, FormatError)):
                self._blame(peer, exc)
            else:
                self.outbox.append(Alert("root.rejected", {"source": source, "reason": exc.reason, "error": str(exc)}))
            if peer is None:
                self.outbox.append(_refused(source, self.trust.root_version, exc))
        for version, data in added:
            self.outbox.append(PersistRoot(version, data))
        if peer is None and added:
            self.outbox.append(PolicyResult(source, True, self.trust.root_version, Verdict.ROOT_ACCEPTED))
        if self.trust.root_version != before:
            self._on_root_changed()
            if self._pending_policy is not None:
                pending, self._pending_policy = self._pending_policy, None
                self._accept_policy(pending, peer, source)

    def _on_root_changed(self) -> None:
        self.membership.on_root_changed(self._now.wall)
        if self._state_now() != self._status_state:
            self._publish_status()

    # -- status --------------------------------------------------------------------------------------
    def status(self, now: Now) -> dict[str, Any]:
        """A JSON-able view: this node, its policy, every member, and cluster convergence (see
        ``protocol.status_view``)."""
        counters = {**self.counters, "misbehaviour_disconnects": self.conduct.disconnects, **self.membership.counters, **self.dissemination.counters,
                    **{f"misbehaviour_{k}": v for k, v in sorted(self.conduct.counts.items())}}
        return status_view(now, self.trust, self.members, node_id=self.node_id, advertise=self.advertise,
                           incarnation=self.membership.own.incarnation, local_health=self.membership.swim.health,
                           enforced=self._enforced, state=self._state_now(), not_enforced=self._lag_alerted,
                           counters=counters)

def _prefix(hex_digest: str) -> bytes:
    try:
        return bytes.fromhex(hex_digest)[:HASH_PREFIX]
    except ValueError:
        raise LocalProtocolError("hashes must be hex") from None


def _refused(source: str, serial: int, exc: TrustError) -> PolicyResult:
    """A refusal for the operator: the stable label (metrics, tests) and the explanation."""
    return PolicyResult(source, False, serial, Verdict.of(exc.reason), str(exc))
