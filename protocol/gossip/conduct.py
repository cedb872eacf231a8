"""Peer conduct: misbehaviour per (peer, kind), alerted once per episode, disconnect on repetition.

Every claim or body from a peer is charged to that peer.  ``PeerConduct.note(peer, kind, now_ms)``
records one offence (an unserved claim, a replayed old policy, a flood of pulls ...) and says what to
do about it:

* the first offence of an episode raises one alert; further offences of the same (peer, kind) only
  count, until the peer has been quiet for ``EPISODE_QUIET_MS`` (the episode ends);
* more than ``limit`` offences within ``WINDOW_MS`` ask for a disconnect (the peer may reconnect; the
  episode, and so the alert, carries on).

Memory is fixed: at most ``MAX_TRACKED`` (peer, kind) entries; the stalest is forgotten first.

``charge`` applies the verdict: it returns the ``Alert`` and ``Disconnect`` effects and closes the
channel in ``ConnectedPeers``; the part that charged forgets what the peer claimed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.gossip.connected_peers import ConnectedPeers
from protocol.gossip.events import Alert, Disconnect, Effect

WINDOW_MS = 60_000
EPISODE_QUIET_MS = 300_000
MAX_TRACKED = 4096
# offences of one kind within WINDOW_MS before the peer is disconnected
LIMITS = {"unserved_claim": 5, "stale_offer": 3, "pull_flood": 20, "equivocating_body": 3}
DEFAULT_LIMIT = 5
# what each kind of peer misbehaviour is alerted as (once per (peer, kind) episode)
CONDUCT_EVENTS = {"stale_offer": "policy.stale_offer", "unserved_claim": "gossip.unserved_claim",
                  "pull_flood": "gossip.pull_flood"}


@dataclass(slots=True)
class _Episode:
    first_ms: int
    last_ms: int
    window_start_ms: int
    in_window: int
    total: int


@dataclass(frozen=True, slots=True)
class Verdict:
    alert: bool  # first offence of an episode: tell the operator
    disconnect: bool  # repeated within the window: drop the channel
    total: int  # offences in this episode


class PeerConduct:
    def __init__(self) -> None:
        self._ep: dict[tuple[str, str], _Episode] = {}
        self.counts: dict[str, int] = {}  # kind -> offences (all peers)
        self.disconnects = 0  # channels closed for misbehaviour

    def charge(self, peer: str, kind: str, facts: dict[str, Any], now_ms: int, connected: ConnectedPeers
               ) -> list[Effect]:
        """Charge one offence to ``peer``: one alert per (peer, kind) episode, and the channel is
        closed (``Disconnect``, and expelled from ``connected``) when it repeats."""
        verdict = self.note(peer, kind, now_ms)
        out: list[Effect] = []
        if verdict.alert:
            out.append(Alert(CONDUCT_EVENTS.get(kind, f"gossip.{kind}"), {"peer": peer, **facts}))
        if verdict.disconnect and peer in connected:
            self.disconnects += 1
            out.append(Disconnect(peer, kind))
            connected.expel(peer)
        return out

    def note(self, peer: str, kind: str, now_ms: int) -> Verdict:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        key = (peer, kind)
        ep = self._ep.get(key)
        fresh = ep is None or now_ms - ep.last_ms >= EPISODE_QUIET_MS
        if ep is None or fresh:
            if ep is None and len(self._ep) >= MAX_TRACKED:
                del self._ep[next(iter(self._ep))]  # insertion order is recency order (see below)
            ep = _Episode(now_ms, now_ms, now_ms, 0, 0)
        self._ep.pop(key, None)  # re-insert: the dict stays ordered by last offence
        self._ep[key] = ep
        if now_ms - ep.window_start_ms >= WINDOW_MS:
            ep.window_start_ms, ep.in_window = now_ms, 0
        ep.in_window += 1
        ep.total += 1
        ep.last_ms = now_ms
        limit = LIMITS.get(kind, DEFAULT_LIMIT)
        disconnect = ep.in_window > limit
        if disconnect:
            ep.window_start_ms, ep.in_window = now_ms, 0
        return Verdict(fresh, disconnect, ep.total)

    def offences(self, peer: str, kind: str) -> int:
        ep = self._ep.get((peer, kind))
        return ep.total if ep is not None else 0

    def forget(self, peer: str) -> None:
        for key in [k for k in self._ep if k[0] == peer]:
            del self._ep[key]

    def __len__(self) -> int:
        return len(self._ep)
