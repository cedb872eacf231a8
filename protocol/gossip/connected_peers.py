"""The peers this node has an open channel to, as the shell reported them (``PeerConnected`` /
``PeerDisconnected``), and those it closed itself for misbehaviour until the shell reports the close.
Shared by the parts that prefer an open channel (probe timeouts, peer selection, pulls)."""

from __future__ import annotations

from collections.abc import Iterator

from protocol.gossip.members import IndexedSet


class ConnectedPeers:
    __slots__ = ("open", "_expelled")

    def __init__(self) -> None:
        self.open = IndexedSet()  # O(1) membership and uniform random choice
        self._expelled: set[str] = set()

    def __contains__(self, peer: object) -> bool:
        return peer in self.open

    def __len__(self) -> int:
        return len(self.open)

    def __iter__(self) -> Iterator[str]:
        return iter(self.open)

    def add(self, peer: str) -> None:
        self.open.add(peer)

    def discard(self, peer: str) -> None:
        """We closed the channel (the peer broke the protocol or its certificate is no good)."""
        self.open.discard(peer)

    def expel(self, peer: str) -> None:
        """We closed the channel for misbehaviour: what we sent it stays counted as sent."""
        self.open.discard(peer)
        self._expelled.add(peer)

    def closed(self, peer: str) -> bool:
        """The shell reports the channel closed; True if we had expelled the peer."""
        self.open.discard(peer)
        if peer in self._expelled:
            self._expelled.discard(peer)
            return True
        return False
