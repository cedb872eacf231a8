"""Which gossip messages travel as datagrams, how big they may be, and how they are retransmitted.

The facts the daemon's datagram layer (``meshnode/daemon/datagrams.py``, ``datagram_frags.py``) and the
simulator's model of it (``simulations/datagrams.py``) must agree on, in one place, sans-IO:

* SWIM probes and dissemination messages (wire tags ``DATAGRAM_TAGS``: Ping, Ack, PingReq, Nack,
  Announce, PolicyPull, PolicyPush, RootPull, RootPush) of at most ``MAX_FRAME`` bytes go as one datagram; up to ``MAX_FRAGMENTED`` bytes as
  ``fragment_count`` fragments of at most ``MAX_FRAME`` bytes each (a ``FRAG_HEADER`` plus a chunk),
  each acknowledged on its own; everything else goes on the stream.  Only on a path that answered a
  probe (``PROBE_TRIES`` tries, ``PROBE_TIMEOUT_S`` each; a blocked path is probed again after
  ``REPROBE_MIN_S``, doubling up to ``REPROBE_MAX_S``).
* Every datagram (frame or fragment) is retransmitted while unacknowledged: the wait after the k-th
  send is ``retry_after_s(rto, k)``; after ``SEND_TRIES`` sends the whole message goes on the stream.
  ``rto_s`` is 3 x the smoothed round trip (``smoothed_rtt``), clamped to [``RTO_MIN_S``, ``RTO_MAX_S``].
"""

from __future__ import annotations

import struct
from typing import Final

from .datagram import MAX_PAYLOAD, OVERHEAD

ID_HEADER: Final = struct.Struct("<BQ")  # kind, probe nonce or message id (a fragment's own id: acked as a frame)
FRAG_HEADER: Final = struct.Struct("<QBB")  # message id, index, count (inside a fragment's payload)
MAX_FRAME: Final = MAX_PAYLOAD - ID_HEADER.size  # the largest message in one datagram
MAX_FRAGMENTS: Final = 16
# SWIM probes (Ping 1, Ack 2, PingReq 3, Nack 4) and dissemination messages (Announce 5, PolicyPull 6,
# PolicyPush 7, RootPull 8, RootPush 9) by their wire tag (protocol.gossip.wire).  On the stream a lost
# segment of a probe or its ack waits for TCP's >= 200 ms retransmission timer, most of a probe's
# timeout: under loss that made members suspect each other falsely; as datagrams a loss is repaired
# after 3 x the path's round trip.
DATAGRAM_TAGS: Final = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9})
SEND_TRIES: Final = 3
RTO_MIN_S: Final = 0.005
RTO_MAX_S: Final = 0.5
RTO_INITIAL_S: Final = 0.1  # before the path's first round-trip sample
RTO_RTTS: Final = 3  # rto = this many smoothed round trips
SRTT_GAIN: Final = 0.125
PROBE_TRIES: Final = 3  # unanswered probes before the path counts as blocked
PROBE_TIMEOUT_S: Final = (0.1, 0.3, 0.9)  # per try (the first probe may beat the acceptor's end of the handshake)
REPROBE_MIN_S: Final = 2.0  # a blocked path is probed again after this, doubling per episode
REPROBE_MAX_S: Final = 30.0
UDP_IP_HEADER: Final = 28  # IPv4 + UDP, per datagram on the wire


def max_message(max_frame: int) -> int:
    """The largest message that goes as fragments of at most ``max_frame`` bytes."""
    return MAX_FRAGMENTS * (max_frame - FRAG_HEADER.size)


MAX_FRAGMENTED: Final = max_message(MAX_FRAME)  # ~18 KB: larger bodies go on the stream


def datagram_worthy(data: bytes) -> bool:
    """A probe or dissemination message (a MessagePack array whose first element is one of its tags) that
    fits in one datagram, or in ``MAX_FRAGMENTED`` bytes of fragments."""
    return 1 < len(data) <= MAX_FRAGMENTED and 0x90 <= data[0] <= 0x9F and data[1] in DATAGRAM_TAGS


def fragment_count(size: int) -> int:
    """How many datagrams a datagram-worthy message of ``size`` bytes takes (1: a whole frame)."""
    if size <= MAX_FRAME:
        return 1
    return -(-size // (MAX_FRAME - FRAG_HEADER.size))


def rto_s(srtt_s: float | None) -> float:
    """The retransmission timeout of a path whose smoothed round trip is ``srtt_s`` (None: no sample yet)."""
    return RTO_INITIAL_S if srtt_s is None else min(RTO_MAX_S, max(RTO_MIN_S, RTO_RTTS * srtt_s))


def smoothed_rtt(srtt_s: float | None, sample_s: float) -> float:
    return sample_s if srtt_s is None else (1 - SRTT_GAIN) * srtt_s + SRTT_GAIN * sample_s


def retry_after_s(rto: float, sends: int) -> float:
    """How long an unacknowledged datagram waits after its ``sends``-th send (linear backoff): with
    ``SEND_TRIES`` = 3 the sends are at 0, rto, 3 rto and the message falls back to the stream at 6 rto."""
    return rto * sends


def wire_bytes(payload: int) -> int:
    """Bytes on the wire of one sealed datagram carrying ``payload`` bytes after its id header."""
    return UDP_IP_HEADER + OVERHEAD + ID_HEADER.size + payload
