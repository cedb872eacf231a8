"""The one place the simulator executes a process's effects (both the full simulation and the fake link).

``execute(host, effects, world)`` writes what the node persisted to the host's ``Disk`` and hands
everything that leaves the host to the ``World`` around it: the network (``Send``, ``Disconnect``),
the enforcer model (the ``Enforce`` of a newly accepted policy), and the observers (every
``Enforce``'s members, ``LivenessChanged``, ``Alert``).  ``PolicyResult`` is the operator's answer and
goes nowhere.  Durable effects come before the sends that announce them in the list the node
returns, and are executed in that order.

A newly accepted policy is an ``Enforce`` right after the ``PersistPolicy`` of its envelope; an
``Enforce`` on its own only updates the members (``applied_policies``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.gossip import (
    Alert,
    Disconnect,
    Enforce,
    LivenessChanged,
    MemberEntry,
    PersistMembers,
    PersistPolicy,
    PersistRoot,
    Send,
)
from protocol.trust import Certificate


@dataclass(slots=True)
class Disk:
    """What one host's node persisted (and the members its enforcer was last given)."""

    policy: bytes | None = None
    roots: list[bytes] = field(default_factory=list)
    members: tuple[MemberEntry, ...] | None = None  # kept only if ``keep_members`` (hosts that restart): n^2 overall
    keep_members: bool = True
    members_persisted: int = 0  # entries in the last persisted member file (kept or not)
    member_entries_written: int = 0  # entries of every member file ever persisted
    directory: Mapping[str, Certificate] | None = None  # the last Enforce's members: the node's own, never mutated
    full: bool = False  # the chaos drill's disk_full: every write fails, the latest of each kind is kept pending
    pending: dict[str, Any] = field(default_factory=dict)

    def write_failed(self, kind: str, value: Any) -> bool:
        """Keep ``value`` as the pending write of ``kind``; True on the first failure of an episode."""
        first = not self.pending
        if kind == "roots":
            self.pending.setdefault("roots", []).append(value)
        else:
            self.pending[kind] = value
        return first

    def flush_pending(self) -> bool:
        """The disk has room again: the pending writes land (the daemon retries them). True if there were any."""
        had = bool(self.pending)
        if "policy" in self.pending:
            self.policy = self.pending["policy"]
        self.roots.extend(self.pending.get("roots", []))
        if "members" in self.pending and self.keep_members:
            self.members = self.pending["members"]
        self.pending.clear()
        return had


class World(Protocol):
    """What a host's effects reach outside the host."""

    def send(self, i: int, eff: Send) -> None: ...

    def disconnect(self, i: int, peer: str) -> None: ...

    def apply_policy(self, i: int, eff: Enforce, effects: list[Any]) -> None:
        """The ``Enforce`` of the first newly accepted policy of an effect list (``effects``), before
        any other effect runs."""

    def directory_changed(self, i: int, before: Mapping[str, Certificate] | None,
                          after: Mapping[str, Certificate]) -> None: ...

    def liveness_changed(self, i: int, eff: LivenessChanged) -> None: ...

    def alert(self, i: int, eff: Alert) -> None: ...

    def write_failed(self, i: int) -> None:
        """The first failed persist of a disk-full episode (only when ``Disk.full``)."""


def applied_policies(effects: list[Any]) -> list[Enforce]:
    """The ``Enforce`` of each newly accepted policy in ``effects``: the one right after its
    ``PersistPolicy`` (an ``Enforce`` on its own only updates the members)."""
    return [e for prev, e in zip(effects, effects[1:], strict=False)
            if isinstance(e, Enforce) and isinstance(prev, PersistPolicy)]


def execute(i: int, disk: Disk, effects: list[Any], world: World) -> None:
    prev = None
    for eff in effects:  # applied_policies(effects)[0], without building the list on every step
        if type(eff) is Enforce and type(prev) is PersistPolicy:
            world.apply_policy(i, eff, effects)
            break
        prev = eff
    for eff in effects:
        t = type(eff)
        if t is Send:
            world.send(i, eff)
        elif disk.full and t in (PersistPolicy, PersistRoot, PersistMembers):
            kind = "policy" if t is PersistPolicy else "roots" if t is PersistRoot else "members"
            if disk.write_failed(kind, eff.entries if t is PersistMembers else eff.envelope):
                world.write_failed(i)
        elif t is PersistPolicy:
            disk.policy = eff.envelope
        elif t is PersistRoot:
            disk.roots.append(eff.envelope)
        elif t is PersistMembers:
            disk.members_persisted = len(eff.entries)
            disk.member_entries_written += disk.members_persisted
            if disk.keep_members:
                disk.members = eff.entries
        elif t is Enforce:
            # eff.members may be the node's own dict (not a copy): read it, never mutate it
            world.directory_changed(i, disk.directory, eff.members)
            disk.directory = eff.members
        elif t is LivenessChanged:
            world.liveness_changed(i, eff)
        elif t is Alert:
            world.alert(i, eff)
        elif t is Disconnect:
            world.disconnect(i, eff.peer)
