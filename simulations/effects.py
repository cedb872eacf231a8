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
