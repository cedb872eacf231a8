"""The one place the core's effects run (``EffectExecutor.execute``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from protocol.channel.datagram_policy import is_body
from protocol.gossip import (
    Alert,
    Disconnect,
    Enforce,
    LivenessChanged,
    PersistMembers,
    PersistPolicy,
    PersistRoot,
    PolicyResult,
    Send,
)
from protocol.trust import TrustedState

from ..enforcer import Enforcer
from ..metrics import Metrics
from ..state import StateStore
from .connections import ConnectionRegistry
from .state_writes import StateWriter

STATE_WRITES = (PersistPolicy, PersistRoot, PersistMembers)  # run after the batch's other effects


class EffectExecutor:
    def __init__(self, *, trust: TrustedState, store: StateStore, state: StateWriter, enforcer: Enforcer,
                 connections: ConnectionRegistry, metrics: Metrics, log: Any,
                 alert: Callable[[str, dict[str, Any]], None],
                 origin: Callable[[], dict[str, Any]] = dict) -> None:
        self.trust = trust
        self.store = store
        self.state = state
        self.enforcer = enforcer
        self.connections = connections
        self.metrics = metrics
        self.log = log
        self.alert = alert
        self.origin = origin  # where the input being handled came from (peer, transport...), for the logs
        self._pushed: tuple[int, list[str]] | None = None  # a new version's eager pushes: (serial, ["peer:via"])
        self._revalidated_for: tuple[int, Any] | None = None  # (root version, revocations) channels were checked for

    def execute(self, effects: Sequence[Any]) -> None:
        """The one place effects run, all synchronously, in the core's order except that the state writes
        of the list run last: a version this node verified goes on to its peers (the eager pushes) before
        the write (an fsync of the file and of its directory: milliseconds on every hop, more on a busy
        disk).  What the node acknowledges still waits for the write: an operator's publish is answered
        after this returns, and only when the state is durable.  A crash between the two loses nothing a
        peer relies on: the node boots with the version before, and learns this one again.

        No effect can stop the daemon or the effects after it: a failed state write is kept pending and
        retried (the policy is still enforced: trusted and enforced never drift apart, the alert says the
        state is not durable), and anything else is logged, counted and alerted."""
        rest: list[Any] = []
        writes: list[Any] = []
        for eff in effects:
            (writes if isinstance(eff, STATE_WRITES) else rest).append(eff)
        self._pushed = None
        for eff in rest + writes:
            if isinstance(eff, PersistPolicy) and self._pushed is not None:  # the sends are done: say where it went
                self.log.info("policy.pushed", serial=self._pushed[0], to=self._pushed[1])
                self._pushed = None
            try:
                self.execute_one(eff)
            except Exception as exc:  # noqa: BLE001 - the bulkhead: one failed effect must not stop the node
                self.metrics.internal_errors.labels(f"effect.{type(eff).__name__}").inc()
                self.alert("node.internal_error", {"effect": type(eff).__name__,
                                                   "error": f"{type(exc).__name__}: {exc}"[:300]})
                self.log.error("effect.failed", effect=type(eff).__name__, exc_info=exc)

    def execute_one(self, eff: Any) -> None:
        match eff:
            case PersistPolicy(serial=serial, envelope=envelope):
                self.state.persist("policy", "policy", lambda: self.store.save_policy(serial, envelope))
            case PersistRoot(version=version, envelope=envelope):
                self.state.persist(f"root.{version}", "root", lambda: self.store.save_root(version, envelope))
            case PersistMembers(entries=entries):
                self.state.persist("members", "members", lambda: self.store.save_members(entries))
            case Enforce(policy=policy, policy_hash=policy_hash, members=members):
                new_policy = policy_hash != self.enforcer.wanted_hash
                self.enforcer.want(policy, list(members.values()), policy_hash)
                if new_policy:
                    self.log.info("policy.accepted", serial=policy.serial, hash=policy_hash[:16], **self.origin())
                    self._pushed = (policy.serial, [])  # the bodies sent on in this batch (eager pushes)
                    self.metrics.observe_policy(self.trust, time.time())
                    # Open channels are re-checked when what a certificate is checked against changed:
                    # the revocations (they travel in the policy) or the root (expiry: a periodic job).
                    checked_against = (policy.root_version, policy.revocations)
                    if checked_against != self._revalidated_for:
                        self._revalidated_for = checked_against
                        self.connections.revalidate()
            case Send(peer=peer, address=address, data=data):
                via = self.connections.send(peer, address, data)
                if self._pushed is not None and is_body(data):
                    self._pushed[1].append(f"{peer}:{via}")
            case Disconnect(peer=peer, reason=reason):
                self.metrics.frames_refused.labels("peer_misbehaved").inc()
                self.log.warning("peer.disconnected", peer=peer, reason=reason)
                self.connections.close_peer(peer, reason)
            case PolicyResult():
                pass  # answered by the caller that submitted it
            case Alert(event=event, fields=fields):
                self.alert(event, fields)
            case LivenessChanged(node_id=nid, liveness=liveness, incarnation=inc):
                self.log.info("member.liveness", member=nid, liveness=liveness, incarnation=inc)
            case _:
                self.log.warning("effect.unknown", effect=type(eff).__name__)
