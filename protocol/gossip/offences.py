"""A peer at fault: what the node does about it.

Two kinds.  A protocol error (a frame that does not decode, a bad signature or format) is ``blame``d:
alerted and the channel closed at once.  Misbehaviour within the protocol (a stale offer, a pull
flood) is ``charge``d to the peer's conduct (see protocol.gossip.conduct): alerted once per episode, the
channel closed when it repeats.  Either way what the peer claimed is forgotten when its channel closes.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import TrustError
from protocol.gossip.conduct import PeerConduct
from protocol.gossip.connected_peers import ConnectedPeers
from protocol.gossip.dissemination import Dissemination
from protocol.gossip.events import Alert, Disconnect, Effect


class PeerOffences:
    def __init__(self, conduct: PeerConduct, connected: ConnectedPeers, dissemination: Dissemination,
                 outbox: list[Effect]) -> None:
        self.conduct = conduct
        self.connected = connected
        self.dissemination = dissemination
        self.outbox = outbox
        self.remote_errors = 0

    def blame(self, peer: str, exc: Exception, now_ms: int) -> None:
        """``peer`` broke the protocol: alert, and close its channel."""
        self.remote_errors += 1
        reason = getattr(exc, "reason", "protocol_error") if isinstance(exc, TrustError) else "protocol_error"
        self.outbox.append(Alert("gossip.remote_error", {"peer": peer, "reason": reason, "error": str(exc)[:200]}))
        if peer:
            self.outbox.append(Disconnect(peer, reason))
            self.connected.discard(peer)
            self.dissemination.forget_source(peer)
            self.dissemination.pull_failed(peer, now_ms)

    def charge(self, peer: str, kind: str, facts: dict[str, Any], now_ms: int) -> None:
        """Charge one offence to ``peer``: one alert per (peer, kind) episode, and the channel is
        closed when it repeats (see protocol.gossip.conduct)."""
        effects = self.conduct.charge(peer, kind, facts, now_ms, self.connected)
        self.outbox += effects
        if any(isinstance(e, Disconnect) for e in effects):
            self.dissemination.forget_source(peer)
