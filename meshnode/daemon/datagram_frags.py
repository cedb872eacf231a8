"""Dissemination messages larger than one datagram, carried as several (the shell's datagram layer).

A policy body of a few kilobytes on the stream crosses a lossy hop as several TCP segments, and a lost
one waits for a retransmission timer (≥ 200 ms); split into datagrams of at most ``MAX_FRAME`` bytes,
each fragment is acknowledged and retransmitted on its own, timed from the path's round trip.

* Sender: ``split(message)`` gives the fragments (``FRAG`` header: message id, index, count); the
  caller sends each one as a reliable datagram of its own (own id, ack, retransmission) and falls back
  to sending the whole message on the stream once, if any fragment exhausts its tries.
* Receiver: ``Reassembly`` per path keeps at most ``MAX_PARTIAL`` incomplete messages of at most
  ``MAX_FRAGMENTS`` fragments for ``PARTIAL_TTL_S`` (oldest dropped first): fragments only come from an
  authenticated peer (every datagram is sealed), and what one peer can hold is bounded.  A fragment
  that contradicts its message (another count, an index out of range) is refused and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.channel.datagram_policy import FRAG_HEADER, MAX_FRAGMENTS, max_message

__all__ = ["FRAG_HEADER", "MAX_FRAGMENTS", "FragmentRefused", "Reassembly", "max_message", "split"]
MAX_PARTIAL = 4  # incomplete messages kept per path
PARTIAL_TTL_S = 5.0


def split(message: bytes, message_id: int, max_frame: int) -> list[bytes]:
    """The fragment payloads of ``message`` (header + chunk each), each at most ``max_frame`` bytes."""
    chunk = max_frame - FRAG_HEADER.size
    count = -(-len(message) // chunk)
    if not 2 <= count <= MAX_FRAGMENTS:
        raise ValueError(f"a message of {len(message)} bytes is not {2}..{MAX_FRAGMENTS} fragments")
    return [FRAG_HEADER.pack(message_id, i, count) + message[i * chunk:(i + 1) * chunk] for i in range(count)]


class FragmentRefused(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Partial:
    count: int
    first_at: float
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class Reassembly:
    """One path's incomplete messages."""

    partial: dict[int, _Partial] = field(default_factory=dict)
    done: dict[int, None] = field(default_factory=dict)  # recently completed ids (late duplicates ignored)
    last_wait_s: float = 0.0  # the last completed message: its first fragment's arrival -> its last one's

    def add(self, payload: bytes, now: float) -> bytes | None:
        """Take one fragment; the whole message once its last fragment arrived, else None
        (FragmentRefused when the fragment is malformed or contradicts its message)."""
        if len(payload) <= FRAG_HEADER.size:
            raise FragmentRefused("fragment_malformed")
        mid, index, count = FRAG_HEADER.unpack_from(payload)
        if not 2 <= count <= MAX_FRAGMENTS or index >= count:
            raise FragmentRefused("fragment_malformed")
        if mid in self.done:
            return None
        self.expire(now)
        p = self.partial.get(mid)
        if p is None:
            while len(self.partial) >= MAX_PARTIAL:
                del self.partial[next(iter(self.partial))]  # the oldest
            p = self.partial[mid] = _Partial(count, now)
        elif p.count != count:
            raise FragmentRefused("fragment_mismatch")
        p.parts[index] = bytes(payload[FRAG_HEADER.size:])
        if len(p.parts) < p.count:
            return None
        del self.partial[mid]
        self.last_wait_s = now - p.first_at
        self.done[mid] = None
        if len(self.done) > 4 * MAX_PARTIAL:
            del self.done[next(iter(self.done))]
        return b"".join(p.parts[i] for i in range(p.count))

    def expire(self, now: float) -> None:
        for mid in [m for m, p in self.partial.items() if now - p.first_at > PARTIAL_TTL_S]:
            del self.partial[mid]
