"""Accepting a policy or a root chain, from the operator or from a peer, and serving them to peers.

``accept_policy`` runs a body through the trusted state (protocol.trust) and tells whoever sent it:
the operator gets a ``PolicyResult`` with the verdict, a peer is blamed (bad signature or format),
charged (a stale offer) or forgotten as a source (a body we cannot use).  A validly signed second
payload at our serial is an equivocation: refused and remembered (or, with a lower hash, accepted in
place of ours).  A policy that needs a newer root is kept while the roots are asked for, and offered
again once ``install_roots`` stepped the root.  A newly accepted policy is returned to the node, which
persists, enforces and announces it.

Serving: a body crosses a link once per version, however often it is asked (``serve_policy_pull``);
roots after the asker's are sent on request.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import (
    EquivocationError,
    ExpiredError,
    FormatError,
    NotYetValidError,
    RevokedError,
    RollbackError,
    RootMismatchError,
    SignatureError,
    TrustError,
)
from protocol.gossip.broadcasts import Piggyback
from protocol.gossip.config import GossipConfig
from protocol.gossip.dissemination import Dissemination
from protocol.gossip.enforcement_status import EnforcementStatus
from protocol.gossip.events import Alert, Effect, PersistRoot, PolicyResult, Verdict
from protocol.gossip.offences import PeerOffences
from protocol.gossip.version_claims import VersionClaims, held_key
from protocol.gossip.wire import PolicyPull, PolicyPush, RootPull, RootPush
from protocol.trust.metadata import decode_policy, payload_hash
from protocol.trust.signing import decode_envelope
from protocol.trust.state import PolicyCheck, TrustedState

PULL_REPEATS_TOLERATED = 2  # refused repeats of one pull before it counts as a flood
MAX_PULL_ANSWERS_TRACKED = 4096  # (peer -> version last served) entries; channels are bounded anyway


class PolicyAcceptance:
    def __init__(self, config: GossipConfig, trust: TrustedState, dissemination: Dissemination,
                 offences: PeerOffences, status: EnforcementStatus, claims: VersionClaims, piggyback: Piggyback,
                 outbox: list[Effect]) -> None:
        self.cfg = config
        self.trust = trust
        self.dissemination = dissemination
        self.offences = offences
        self.status = status
        self.claims = claims
        self.piggyback = piggyback
        self.outbox = outbox
        self._pending_policy: bytes | None = None  # a body waiting for the root it needs
        # peer -> [version, when, repeats refused] of the last body served to it (lost with the channel)
        self._served: dict[str, list[Any]] = {}
        self.stale_offers = 0
        self.pull_answers_refused = 0

    # -- policy ---------------------------------------------------------------------------------------
    def accept_policy(self, envelope: bytes, peer: str | None, source: str, now_ms: int, wall: float
                      ) -> PolicyCheck | None:
        """``peer``: the peer that sent the body, None for the operator (``source`` names either).
        Returns the check of a newly trusted policy, None otherwise (refused, duplicate, pending)."""
        local = peer is None
        if peer is not None:
            # Cheap pre-filter against the trusted floor only (never against a claim): a body we
            # already hold, or one below the floor, costs no signature check.
            peek = self.trust.verified_claims(envelope) or _peek(envelope)
            if peek is not None:  # a pull of something newer answered with something older is unserved
                self.dissemination.body_from(peer, (peek[2], peek[0]), bytes.fromhex(peek[1]), now_ms)
            floor = self.trust.serial_floor  # the serial itself, except after a policy-key rotation
            if peek is not None and peek[0] == floor == self.trust.serial:
                if peek[1] == self.trust.policy_hash:
                    self.dissemination.note_has(peer, held_key(self.trust))  # a duplicate: nothing to verify
                    return None
                if self.trust.knows_equivocating(peek[0], peek[1]):
                    # verified and refused before: not again
                    self.dissemination.drop_candidate(held_key(self.trust), bytes.fromhex(peek[1]))
                    return None
            if peek is not None and peek[0] < floor:
                self.stale_offers += 1
                self.dissemination.forget_source(peer)
                self.dissemination.pull_failed(peer, now_ms, unserved=True)
                self.offences.charge(peer, "stale_offer", {"serial": peek[0], "trusted_serial": self.trust.serial},
                                     now_ms)
                return None
        try:
            check = self.trust.accept_policy(envelope, wall)
        except RootMismatchError as exc:
            if exc.needed_version and exc.needed_version > self.trust.root_version and peer is not None:
                self._pending_policy = envelope
                self.claims.ask_roots(peer, now_ms)
            if local:
                self.outbox.append(_refused(source, _peek_serial(envelope), exc))
            return None
        except (SignatureError, FormatError) as exc:
            if local:
                self.outbox.append(_refused(source, 0, exc))
                self.outbox.append(Alert("policy.rejected", {"source": source, "reason": exc.reason, "error": str(exc)}))
            else:
                assert peer is not None
                self.offences.blame(peer, exc, now_ms)
            return None
        except EquivocationError as exc:
            # A validly signed second payload at our serial with a higher hash: refused, remembered.
            self.status.note_equivocation(wall)
            if local:
                self.outbox.append(_refused(source, _peek_serial(envelope), exc))
            elif peer is not None:
                peek = _peek(envelope)
                if peek is not None:
                    self.dissemination.drop_candidate(held_key(self.trust), bytes.fromhex(peek[1]))
            return None
        except (RollbackError, ExpiredError, NotYetValidError, RevokedError, TrustError) as exc:
            event = {"rollback": "policy.rollback_attempt"}.get(exc.reason, "policy.rejected")
            self.outbox.append(Alert(event, {"source": source, "reason": exc.reason, "error": str(exc)}))
            if local:
                self.outbox.append(_refused(source, _peek_serial(envelope), exc))
            elif peer is not None:
                self.dissemination.forget_source(peer)
                self.dissemination.pull_failed(peer, now_ms, unserved=True)
            return None
        pol = check.policy
        if check.duplicate:
            if local:
                self.outbox.append(PolicyResult(source, True, pol.serial, Verdict.DUPLICATE))
            if peer is not None:
                self.dissemination.note_has(peer, (pol.root_version, pol.serial))
            self.dissemination.done((pol.root_version, pol.serial), bytes.fromhex(check.hash))
            return None
        self._pending_policy = None
        return check

    # -- roots ----------------------------------------------------------------------------------------
    def install_roots(self, chain: list[bytes], peer: str | None, source: str, now_ms: int) -> bool:
        """Trust the roots of ``chain`` that step ours in order; whether the root version changed."""
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
                self.offences.blame(peer, exc, now_ms)
            else:
                self.outbox.append(Alert("root.rejected", {"source": source, "reason": exc.reason, "error": str(exc)}))
            if peer is None:
                self.outbox.append(_refused(source, self.trust.root_version, exc))
        for version, data in added:
            self.outbox.append(PersistRoot(version, data))
        if peer is None and added:
            self.outbox.append(PolicyResult(source, True, self.trust.root_version, Verdict.ROOT_ACCEPTED))
        return self.trust.root_version != before

    def take_pending(self) -> bytes | None:
        """The body that waited for a newer root (to be offered again once the root stepped)."""
        pending, self._pending_policy = self._pending_policy, None
        return pending

    # -- serving --------------------------------------------------------------------------------------
    def serve_policy_pull(self, peer: str, msg: PolicyPull, now_ms: int) -> None:
        """Serve our body at most once per (peer, version) within ``pull_answer_window_ms`` (again
        after the channel broke): a body crosses a link once per version, however often it is asked."""
        env = self.trust.policy_bytes
        if env is None or self.trust.serial < msg.serial:
            return
        rv, serial = held_key(self.trust)
        version = (rv, serial, self.trust.policy_hash or "")
        last = self._served.get(peer)
        if last is not None and last[0] == version and now_ms - last[1] < self.cfg.pull_answer_window_ms:
            self.pull_answers_refused += 1
            last[2] += 1
            if last[2] > PULL_REPEATS_TOLERATED:  # an honest puller asks again only when it lost track
                self.offences.charge(peer, "pull_flood", {"serial": serial}, now_ms)
            return
        if last is None and len(self._served) >= MAX_PULL_ANSWERS_TRACKED:
            self._served.clear()
        self._served[peer] = [version, now_ms, 0]
        self.dissemination.note_has(peer, (rv, serial))
        self.dissemination.counters["bodies_served"] += 1
        self.outbox.append(self.piggyback.send(peer, PolicyPush(env)))

    def push_policy(self, peers: list[str], now_ms: int) -> None:
        """Push our body to ``peers`` unasked (the broadcast tree): it counts as served to them, so a pull
        that crossed the push on the wire is not answered with a second copy."""
        env = self.trust.policy_bytes
        if env is None:
            return
        rv, serial = held_key(self.trust)
        version = (rv, serial, self.trust.policy_hash or "")
        for peer in peers:
            if peer not in self._served and len(self._served) >= MAX_PULL_ANSWERS_TRACKED:
                self._served.clear()
            self._served[peer] = [version, now_ms, 0]
            self.outbox.append(self.piggyback.send(peer, PolicyPush(env)))

    def channel_lost(self, peer: str) -> None:
        """What we served ``peer`` may have been lost with the channel: serve it again when asked."""
        self._served.pop(peer, None)

    def serve_root_pull(self, peer: str, msg: RootPull) -> None:
        cur = self.trust.root_version
        chain = [self.trust.root_bytes(v) for v in range(max(msg.have_version + 1, 1), cur + 1)]
        roots = tuple(b for b in chain if b is not None)
        if roots:
            self.outbox.append(self.piggyback.send(peer, RootPush(roots)))


def _peek(envelope: bytes) -> tuple[int, str, int] | None:
    """(serial, payload hash, root version) a body claims, unverified: only to skip work and to tell
    whether it answers a pull, never to trust."""
    try:
        payload = decode_envelope(envelope, "policy").payload
        pv = decode_policy(payload)
        return pv.serial, payload_hash(payload), pv.root_version
    except (FormatError, TrustError):
        return None


def _peek_serial(envelope: bytes) -> int:
    peek = _peek(envelope)
    return peek[0] if peek is not None else 0


def _refused(source: str, serial: int, exc: TrustError) -> PolicyResult:
    """A refusal for the operator: the stable label (metrics, tests) and the explanation."""
    return PolicyResult(source, False, serial, Verdict.of(exc.reason), str(exc))
