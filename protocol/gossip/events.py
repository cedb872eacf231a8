"""Inputs (past tense) and effects (imperative) of the gossip node, and the clock it is given.

All are frozen slotted dataclasses.  The shell feeds inputs to ``Node.handle(now, input)`` and executes
the returned effects in order: durable effects (``PersistPolicy``, ``Enforce``) always come before the
``Send`` effects that announce what they made durable.  Effects carry everything the shell needs, already
verified and decoded by the core: the shell never decodes them again nor reads the core's trust state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from protocol.gossip.wire import ProbeReport
from protocol.trust.metadata import Certificate, PolicyVersion


@dataclass(frozen=True, slots=True)
class Now:
    """Monotonic milliseconds (timers) and wall-clock seconds (validity windows)."""

    ms: int
    wall: float


# -- inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FrameReceived:
    """One gossip message from an authenticated peer (``peer`` = its node_id), already decrypted."""

    peer: str
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A channel to ``peer`` is open; ``cert_bytes`` is the certificate it authenticated with."""

    peer: str
    cert_bytes: bytes


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    peer: str


@dataclass(frozen=True, slots=True)
class SendFailed:
    """A Send could not be delivered (dial failed, channel broke before the write). ``peer`` is ""
    for a dial by address whose owner was never learned; ``address`` is the address dialled."""

    peer: str
    address: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The deadline from ``next_deadline()`` passed (spurious calls are harmless).  The first input
    a node sees, whatever it is, starts it: it signs its member record and contacts its seeds."""


@dataclass(frozen=True, slots=True)
class PolicySubmitted:
    """A policy envelope from a local source (operator push, drop directory, URL poll)."""

    envelope: bytes
    source: str


@dataclass(frozen=True, slots=True)
class RootsSubmitted:
    """A root chain (exact signed bytes, oldest first) from a local source."""

    chain: list[bytes]
    source: str


@dataclass(frozen=True, slots=True)
class RulesetApplied:
    """The enforcer rendered and loaded the ruleset for ``serial``; ``ruleset_hash`` is its hex digest
    and ``policy_hash`` the hex payload hash of the policy it enforced ("": the one of the latest
    ``Enforce`` of that serial).  This confirmation, not what the node trusts, is what its signed
    status reports as enforced, so the cluster view counts only enforced versions as converged."""

    serial: int
    ruleset_hash: str
    policy_hash: str = ""


@dataclass(frozen=True, slots=True)
class ValidationReported:
    """The shell's validation summary, for this node's signed status: its latest external probe of
    each peer it validated (``reports``, newest first; the node keeps at most ``MAX_VALIDATIONS``) and
    its open alerts per severity (``alerts_open``: critical, error, warning, info).  The node signs a
    new status at once when a finding or a count changed, otherwise at most every
    ``GossipConfig.validation_refresh_ms`` (a new probe time alone is not worth a status per round)."""

    reports: tuple[ProbeReport, ...]
    alerts_open: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class LeaveRequested:
    """Graceful shutdown: tell the cluster this node left (it is then ``left``, not ``dead``)."""


Input = (
    FrameReceived | PeerConnected | PeerDisconnected | SendFailed | TimerFired | PolicySubmitted
    | RootsSubmitted | RulesetApplied | ValidationReported | LeaveRequested
)


# -- effects -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``data`` to ``peer`` over its channel, dialling ``address`` when none is open.
    ``peer == ""`` means "dial this address, whoever it is" (bootstrapping from seed addresses)."""

    peer: str
    address: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Disconnect:
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class Enforce:
    """Enforce ``policy`` (verified; ``policy_hash`` = hex SHA-256 of its signed payload) for the valid,
    unrevoked ``members`` (node_id -> decoded certificate, self included).  Emitted when the trusted
    policy or the member directory changes; liveness never changes the directory, only certificate
    validity and revocation do.  ``members`` may be shared with the core: read it, never mutate it."""

    policy: PolicyVersion
    policy_hash: str
    members: Mapping[str, Certificate]


@dataclass(frozen=True, slots=True)
class PersistPolicy:
    """Write the accepted policy envelope (exact signed bytes) atomically, named by its serial."""

    serial: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class PersistRoot:
    """Write a newly trusted root (exact signed bytes) atomically; each new one comes in version order."""

    version: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """One member in the persisted member file: where to reach it, and the certificate enforcement
    uses for it (exact signed bytes; re-verified on load).  ``address`` is "" for a member remembered
    from the previous run and not heard from since."""

    node_id: str
    address: str
    region: str
    cert: bytes


@dataclass(frozen=True, slots=True)
class PersistMembers:
    """Write the member file atomically: for restarts without seeds, and so a reboot enforces full sets.
    ``entries`` is a tuple, or (a simulated node over a shared converged directory) a read-only view."""

    entries: Sequence[MemberEntry]


class Verdict(StrEnum):
    """Why a locally submitted policy or root chain was accepted or refused (a stable metric label)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    ROOT_ACCEPTED = "root_accepted"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_SIGNATURE = "bad_signature"
    ROLLBACK = "rollback"
    EQUIVOCATION = "equivocation"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    ROOT_MISMATCH = "root_mismatch"
    ROLE = "role"
    UNTRUSTED = "untrusted"
    NO_VERDICT = "no_verdict"

    @classmethod
    def of(cls, reason: str) -> Verdict:
        """The verdict for a ``TrustError.reason`` label."""
        try:
            return cls(reason)
        except ValueError:
            return cls.UNTRUSTED


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Answer to a PolicySubmitted / RootsSubmitted: accepted or not, why (``reason``), and the
    explanation for the operator (``detail``).  ``serial`` is the policy serial (the root version for
    a root chain)."""

    source: str
    accepted: bool
    serial: int
    reason: Verdict
    detail: str = ""

    @property
    def text(self) -> str:
        """One line for an operator: the label, then the explanation."""
        return f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an operator must hear about (stable dotted event name, facts as fields)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LivenessChanged:
    """A member became suspect, dead or left, or came back alive (joins are not reported).
    For logs and metrics only: enforcement never depends on it."""

    node_id: str
    liveness: str
    incarnation: int
    source: str = ""  # who suspected / declared it ("" when it came back alive or left)


Effect = (
    Send | Disconnect | Enforce | PersistPolicy | PersistRoot | PersistMembers | PolicyResult | Alert
    | LivenessChanged
)
