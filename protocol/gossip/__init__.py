"""Gossip: the node that keeps the member directory and spreads policy versions, made of small parts.

Read top-down: ``node`` (the façade: ``handle(now, input) -> effects``, ``next_deadline()``) decodes a
message (``wire``) and hands it to one part; parts return messages and deadlines, never call back.

* ``events``   inputs (past tense) and effects (imperative) of the node; ``config`` its timers and knobs.
* ``wire``     the gossip messages (msgspec, MessagePack), decoded with a size cap.
* membership   ``membership`` ties ``member_table`` (columns per member), ``members`` (interned ids,
               shared verify cache), ``member_records`` (verifying records, statuses, certificates),
               ``own_record`` (our signed record; refutation), ``swim`` (SWIM + Lifeguard),
               ``antientropy`` (push-pull digests, joining, retries), ``peer_selection``,
               ``broadcasts`` (piggybacked rumours), ``connected_peers``.
* policy       ``dissemination`` (announce, pull, push), ``version_claims`` (peers' claims as bounded
               hints), ``acceptance`` (a body through trust; verdicts), ``conduct`` and ``offences``
               (misbehaviour per peer), ``directory`` (what enforcement gets), ``enforcement_status``
               (enforced vs trusted, the signed status), ``status_view`` (the operator's JSON view).

The shells import from here (``from protocol.gossip import Node, Send, Enforce``).
"""

from protocol.gossip.config import GossipConfig
from protocol.gossip.events import (
    Alert,
    Disconnect,
    Effect,
    Enforce,
    FrameReceived,
    Input,
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
from protocol.gossip.node import Node

__all__ = [
    "Alert",
    "Disconnect",
    "Effect",
    "Enforce",
    "FrameReceived",
    "GossipConfig",
    "Input",
    "LeaveRequested",
    "LivenessChanged",
    "MemberEntry",
    "Node",
    "Now",
    "PeerConnected",
    "PeerDisconnected",
    "PersistMembers",
    "PersistPolicy",
    "PersistRoot",
    "PolicyResult",
    "PolicySubmitted",
    "RootsSubmitted",
    "RulesetApplied",
    "Send",
    "SendFailed",
    "TimerFired",
    "Verdict",
]
