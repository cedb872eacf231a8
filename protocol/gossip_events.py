"""Inputs (past tense) and effects (imperative) of the gossip node, and the clock it is given.

All are frozen slotted dataclasses.  The shell feeds inputs to ``Node.handle(now, input)`` and executes
the returned effects in order: durable effects (``Persist``, ``ApplyPolicy``) always come before the
``Send`` effects that announce what they made durable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    ``ApplyPolicy`` of that serial).  This confirmation, not what the node trusts, is what its signed
    status reports as enforced, so the cluster view counts only enforced versions as converged."""

    serial: int
    ruleset_hash: str
    policy_hash: str = ""


@dataclass(frozen=True, slots=True)
class LeaveRequested:
    """Graceful shutdown: tell the cluster this node left (it is then ``left``, not ``dead``)."""


Input = (
    FrameReceived | PeerConnected | PeerDisconnected | SendFailed | TimerFired | PolicySubmitted
    | RootsSubmitted | RulesetApplied | LeaveRequested
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
class ApplyPolicy:
    """Enforce this verified policy (``hash`` = hex SHA-256 of the signed payload)."""

    envelope: bytes
    serial: int
    hash: str


@dataclass(frozen=True, slots=True)
class Persist:
    """Write atomically. kinds: "policy" (envelope bytes), "root" (one root's bytes, each new one in
    order), "peers" (msgpack list of {node_id, address, region})."""

    kind: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MembersChanged:
    """The valid, unrevoked certificate directory (node_id -> exact cert envelope bytes), self
    included.  Liveness never changes it; only certificate validity and revocation do."""

    certs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Answer to a PolicySubmitted / RootsSubmitted: accepted or not, and why."""

    source: str
    accepted: bool
    serial: int
    reason: str


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
    Send | Disconnect | ApplyPolicy | Persist | MembersChanged | PolicyResult | Alert | LivenessChanged
)
