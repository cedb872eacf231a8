"""What this node enforces versus what it trusts, and the signed status that says so.

The enforcer confirms what the kernel enforces with ``RulesetApplied``; the trusted state says what the
node verified.  They differ while a new policy is being applied; when they differ for longer than
``enforce_grace_ms`` that is its own state, ``not_enforced``, with an alert (``policy.not_enforced``)
and a resolution (``policy.not_enforced.resolved``) when the enforcer catches up.  Every change of
state, every confirmation and every equivocation seen is published in our signed status record, and
so is the shell's validation summary (``ValidationReported``: external probes of peers, open alerts).
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError
from protocol.gossip.config import GossipConfig
from protocol.gossip.events import Alert, Effect, RulesetApplied, ValidationReported
from protocol.gossip.own_record import OwnRecord
from protocol.gossip.wire import HASH_PREFIX, MAX_REPORT_PORTS, MAX_VALIDATIONS, ProbeReport
from protocol.trust.state import Equivocation, TrustedState


class EnforcementStatus:
    def __init__(self, config: GossipConfig, trust: TrustedState, own: OwnRecord, outbox: list[Effect],
                 enforced: tuple[int, str] | None) -> None:
        """``enforced``: (serial, ruleset hash hex) the shell's enforcer confirmed before the node was
        built (the boot apply of the last-known-good policy), as if by ``RulesetApplied``."""
        self.cfg = config
        self.trust = trust
        self.own = own
        self.outbox = outbox
        # What the enforcer confirmed: (serial, policy hash hex, ruleset hash prefix).  Status reports
        # this, not what we trust.
        self.enforced: tuple[int, str, bytes] = (0, "", b"")
        if enforced is not None and enforced[0]:
            h = trust.policy_hash if enforced[0] == trust.serial and trust.policy_hash else ""
            self.enforced = (enforced[0], h, _prefix(enforced[1]))
        self._applying: tuple[int, str] = (0, "")  # the policy of our latest Enforce (serial, hash)
        self._lag_since: int | None = None
        self.not_enforced = False  # alerted: trusted != enforced for longer than the grace period
        self._published_state = ""
        self._stale_alerted = False
        self._equivocation_alerted: Equivocation | None = None
        self.equivocations_seen = 0
        self._reports: tuple[ProbeReport, ...] = ()  # the shell's validation summary (ValidationReported)
        self._alerts_open: tuple[int, ...] = ()
        self._published_findings: tuple[object, ...] = ((), ())
        self._published_wall = float("-inf")

    def state(self, wall: float) -> str:
        """``none``/``fresh``/``stale`` (trust.policy_state), or ``not_enforced``: trusted but not
        confirmed by the enforcer for longer than the grace period."""
        return "not_enforced" if self.not_enforced else self.trust.policy_state(wall)

    def publish(self, wall: float) -> None:
        """Sign and broadcast our status: what is enforced, what is trusted, any equivocation."""
        state = self.state(wall)
        h = self.trust.policy_hash
        e_serial, e_hash, e_rules = self.enforced
        self._published_state = state
        self._published_findings = _findings(self._reports, self._alerts_open)
        self._published_wall = wall
        eq = self.trust.equivocation
        self.own.sign_status(e_serial, bytes.fromhex(e_hash) if e_hash else b"", e_rules, state, wall,
                             trusted=(self.trust.serial, bytes.fromhex(h) if h else b""),
                             equivocation=(eq.serial, tuple(bytes.fromhex(x) for x in eq.hashes)) if eq else (0, ()),
                             validations=self._reports, alerts_open=self._alerts_open)

    def on_validation(self, inp: ValidationReported, wall: float) -> None:
        """The shell's validation summary: signed at once when a finding (target, holes, blocked) or an
        alert count changed, otherwise with the next status, or after ``validation_refresh_ms``."""
        self._reports = tuple(
            ProbeReport(r.target, r.at, r.checked, r.holes[:MAX_REPORT_PORTS], r.blocked[:MAX_REPORT_PORTS])
            for r in inp.reports[:MAX_VALIDATIONS])
        self._alerts_open = tuple(max(0, n) for n in inp.alerts_open)
        changed = _findings(self._reports, self._alerts_open) != self._published_findings
        if changed or (wall - self._published_wall) * 1000 >= self.cfg.validation_refresh_ms:
            self.publish(wall)

    def publish_if_changed(self, wall: float) -> None:
        if self.state(wall) != self._published_state:
            self.publish(wall)

    def housekeeping(self, wall: float) -> None:
        """A policy going stale is alerted once and published."""
        state = self.state(wall)
        if state != self._published_state:
            if state == "stale" and not self._stale_alerted:
                self._stale_alerted = True
                self.outbox.append(Alert("policy.stale", {"serial": self.trust.serial}))
            self.publish(wall)

    def applying(self, serial: int, policy_hash: str) -> None:
        """We handed the enforcer this policy (a later ``RulesetApplied`` may omit its hash)."""
        self._applying = (serial, policy_hash)

    def on_ruleset_applied(self, inp: RulesetApplied, now_ms: int, wall: float) -> None:
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
        self.enforced = (inp.serial, ph, rh)
        self.check(now_ms, wall)
        self.publish(wall)

    def check(self, now_ms: int, wall: float) -> None:
        """Trusted-but-not-enforced is its own state: alert after the grace period, resolve when the
        enforcer catches up."""
        serial, h = self.trust.serial, self.trust.policy_hash or ""
        if not serial or (self.enforced[0] == serial and self.enforced[1] == h):
            self._lag_since = None
            if self.not_enforced:
                self.not_enforced = False
                self.outbox.append(Alert("policy.not_enforced.resolved", {"serial": serial, "hash": h}))
                self.publish(wall)
            return
        if self._lag_since is None:
            self._lag_since = now_ms
        elif not self.not_enforced and now_ms - self._lag_since >= self.cfg.enforce_grace_ms:
            self.not_enforced = True
            e_serial, e_hash, _ = self.enforced
            self.outbox.append(Alert("policy.not_enforced", {
                "trusted_serial": serial, "trusted_hash": h, "enforced_serial": e_serial,
                "enforced_hash": e_hash, "for_ms": now_ms - self._lag_since}))
            self.publish(wall)

    def next_deadline(self) -> int | None:
        """When the grace period runs out (None: nothing pending, or already alerted)."""
        if self._lag_since is None or self.not_enforced:
            return None
        return self._lag_since + self.cfg.enforce_grace_ms

    def note_equivocation(self, wall: float) -> None:
        """Alert once per equivocation (serial and set of hashes) and put it in our signed status."""
        eq = self.trust.equivocation
        if eq is None or eq == self._equivocation_alerted:
            return
        self._equivocation_alerted = eq
        self.equivocations_seen += 1
        self.outbox.append(Alert("policy.equivocation", {
            "serial": eq.serial, "root_version": eq.root_version, "hashes": list(eq.hashes),
            "kept": eq.hashes[0]}))
        self.publish(wall)


def _findings(reports: tuple[ProbeReport, ...], alerts_open: tuple[int, ...]) -> tuple[object, ...]:
    """What of a validation summary is worth a new signed status at once (not the probe times)."""
    return (tuple(sorted((r.target, r.holes, r.blocked) for r in reports)), alerts_open)


def _prefix(hex_digest: str) -> bytes:
    try:
        return bytes.fromhex(hex_digest)[:HASH_PREFIX]
    except ValueError:
        raise LocalProtocolError("hashes must be hex") from None
