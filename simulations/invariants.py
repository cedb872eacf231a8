"""Invariants checked after every step of a simulation.

* No node ever applies an unverified, forged or older policy: a new policy comes as a ``PersistPolicy``
  of an envelope the authority signed (checked with real signature verification, cached by hash)
  followed by the ``Enforce`` of that very policy (same serial and hash), with a serial above what
  that node applied before, before any ``Send`` of that list announces it.  The one exception is an equivocation (the authority
  signed two payloads with one serial): a node may re-apply that serial once, with a lower hash, and
  never go back (no flip-flop).
* The Byzantine guarantee (``checks.convergence_bound_ms``, see ``simulations/hostile.py``): every
  honest node applies every published version within the bound, whatever the hostile nodes do.
* The certificate directory given to enforcement only shrinks by revocation or expiry, never by
  liveness.
* A restarted node comes back enforcing what it enforced before the crash.
* After the faults end (plus a settle time) every live node converges to the last version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.errors import TrustError
from protocol.gossip import Enforce, PersistPolicy, Send
from protocol.trust import TrustedState

MAX_LISTED = 20


@dataclass
class Invariants:
    anchor: bytes
    legit: dict[str, int] = field(default_factory=dict)  # policy hash -> serial (authority-signed)
    revoked_nodes: set[str] = field(default_factory=set)
    count: int = 0
    listed: list[str] = field(default_factory=list)
    _verified: dict[bytes, tuple[int, str] | None] = field(default_factory=dict)
    _applied_hash: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # node -> (serial, hash, changes)

    def violation(self, seed: int, at_ms: int, text: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(f"t={at_ms}ms seed={seed}: {text}")

    def _verify(self, envelope: bytes) -> tuple[int, str] | None:
        key = hashlib.sha256(envelope).digest()
        if key not in self._verified:
            try:
                # Signature and format against the trusted root, independent of any node's state.
                fresh = TrustedState(self.anchor, skew_s=10**9)
                chk = fresh.check_policy(envelope, 0.0 + self._issue_time(envelope))
                self._verified[key] = (chk.policy.serial, chk.hash)
            except TrustError:
                self._verified[key] = None
        return self._verified[key]

    @staticmethod
    def _issue_time(envelope: bytes) -> float:
        from protocol.trust import decode_envelope, decode_policy

        try:
            return float(decode_policy(decode_envelope(envelope, "policy").payload).issued_at)
        except TrustError:
            return 0.0

    def check_effects(self, seed: int, at_ms: int, node_id: str, applied_serial: int, effects: list) -> int:
        """Check one effect list; returns the node's applied serial afterwards."""
        sent_before_apply = False
        prev = None
        for eff in effects:
            if isinstance(eff, Send):
                sent_before_apply = True
            elif isinstance(eff, Enforce) and isinstance(prev, PersistPolicy):  # a new policy
                serial, h = eff.policy.serial, eff.policy_hash
                ok = self._verify(prev.envelope)
                if ok is None:
                    self.violation(seed, at_ms, f"{node_id} applied a policy that does not verify")
                elif ok[1] not in self.legit:
                    self.violation(seed, at_ms, f"{node_id} applied a policy the authority never signed")
                elif ok[0] != serial or ok[1] != h or prev.serial != serial:
                    self.violation(seed, at_ms, f"{node_id} applied serial {serial} with a mismatched digest")
                last = self._applied_hash.get(node_id)
                if serial == applied_serial and last is not None and last[0] == serial:
                    if h >= last[1] or last[2] >= 1:
                        self.violation(seed, at_ms, f"{node_id} re-applied serial {serial} with hash "
                                                    f"{h[:12]} after {last[1][:12]} (flip-flop)")
                    self._applied_hash[node_id] = (serial, h, last[2] + 1)
                elif serial <= applied_serial:
                    self.violation(seed, at_ms, f"{node_id} applied serial {serial} after {applied_serial}")
                else:
                    self._applied_hash[node_id] = (serial, h, 0)
                if sent_before_apply:
                    # Sends before the apply in the same list must not announce it.
                    self._check_no_early_announce(seed, at_ms, node_id, effects, eff)
                applied_serial = max(applied_serial, serial)
            prev = eff
        return applied_serial

    def _check_no_early_announce(self, seed: int, at_ms: int, node_id: str, effects: list, apply: Enforce) -> None:
        from protocol.errors import RemoteProtocolError
        from protocol.gossip.wire import Announce, decode

        for eff in effects:
            if eff is apply:
                return
            if isinstance(eff, Send):
                try:
                    msg = decode(eff.data)
                except RemoteProtocolError:  # baselines send their own (non-gossip) frames
                    continue
                if isinstance(msg, Announce) and msg.digest.serial >= apply.policy.serial:
                    self.violation(seed, at_ms, f"{node_id} announced serial {apply.policy.serial} before applying it")

    def check_directory(self, seed: int, at_ms: int, node_id: str, before: Mapping[str, object] | None,
                        after: Mapping[str, object], expired: frozenset[str] | set[str] = frozenset()) -> None:
        """``after`` may be the node's own directory (an ``Enforce``'s members): it is only read."""
        if before is None or before is after:
            return
        dropped = getattr(after, "dropped_from", None)  # a view over a shared converged directory
        cheap = dropped(before) if dropped is not None else None
        gone = set(cheap) if cheap is not None else before.keys() - after.keys()  # C-level; empty unless dropped
        if gone:
            gone -= self.revoked_nodes
            gone -= expired
            for nid in before:  # in directory order, for a deterministic listing
                if nid in gone:
                    self.violation(seed, at_ms, f"{node_id} dropped {nid} from enforcement without revocation")
