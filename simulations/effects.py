"""The one place the simulator executes a process's effects (both the full simulation and the fake link).

``execute(host, effects, world)`` writes what the node persisted to the host's ``Disk`` and hands
everything that leaves the host to the ``World`` around it: the network (``Send``, ``Disconnect``),
the enforcer model (``ApplyPolicy``), and the observers (``MembersChanged``, ``LivenessChanged``,
``Alert``).  ``PolicyResult`` is the operator's answer and goes nowhere.  Durable effects come before
the sends that announce them in the list the node returns, and are executed in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.gossip_events import (
    Alert,
    ApplyPolicy,
    Disconnect,
    LivenessChanged,
    MembersChanged,
    Persist,
    Send,
)


@dataclass(slots=True)
class Disk:
    """What one host's node persisted (and what its enforcer was last given)."""

    policy: bytes | None = None
    roots: list[bytes] = field(default_factory=list)
    peers: bytes | None = None  # kept only if ``keep_peers`` (hosts that restart): n^2 bytes overall
    keep_peers: bool = True
    peers_bytes: int = 0  # size of the last persisted peer list (kept or not)
    peers_bytes_written: int = 0  # every peer list ever persisted
    directory: dict[str, bytes] | None = None  # the last MembersChanged dict: the node's own, never mutated


class World(Protocol):
    """What a host's effects reach outside the host."""

    def send(self, i: int, eff: Send) -> None: ...

    def disconnect(self, i: int, peer: str) -> None: ...

    def apply_policy(self, i: int, eff: ApplyPolicy, effects: list[Any]) -> None:
        """The first ``ApplyPolicy`` of an effect list (``effects``), before any other effect runs."""

    def directory_changed(self, i: int, before: dict[str, bytes] | None, after: dict[str, bytes]) -> None: ...

    def liveness_changed(self, i: int, eff: LivenessChanged) -> None: ...

    def alert(self, i: int, eff: Alert) -> None: ...


def execute(i: int, disk: Disk, effects: list[Any], world: World) -> None:
    for eff in effects:
        if type(eff) is ApplyPolicy:
            world.apply_policy(i, eff, effects)
            break
    for eff in effects:
        t = type(eff)
        if t is Send:
            world.send(i, eff)
        elif t is Persist:
            if eff.kind == "policy":
                disk.policy = eff.data
            elif eff.kind == "root":
                disk.roots.append(eff.data)
            elif eff.kind == "peers":
                disk.peers_bytes = len(eff.data)
                disk.peers_bytes_written += disk.peers_bytes
                if disk.keep_peers:
                    disk.peers = eff.data
        elif t is MembersChanged:
            # eff.certs may be the node's own dict (not a copy): read it, never mutate it
            world.directory_changed(i, disk.directory, eff.certs)
            disk.directory = eff.certs
        elif t is LivenessChanged:
            world.liveness_changed(i, eff)
        elif t is Alert:
            world.alert(i, eff)
        elif t is Disconnect:
            world.disconnect(i, eff.peer)
