"""Which gossip messages travel as datagrams, how big they may be, and how they are retransmitted.

The facts the daemon's datagram layer (``meshnode/daemon/datagrams.py``, ``datagram_frags.py``) and the
simulator's model of it (``simulations/datagrams.py``) must agree on, in one place, sans-IO:

* SWIM probes and dissemination messages (wire tags ``DATAGRAM_TAGS``: Ping, Ack, PingReq, Nack,
  Announce, PolicyPull, PolicyPush, RootPull, RootPush) of at most ``MAX_FRAME`` bytes go as one datagram; up to ``MAX_FRAGMENTED`` bytes as
  ``fragment_count`` fragments of at most ``MAX_FRAME`` bytes each (a ``FRAG_HEADER`` plus a chunk),
  each acknowledged on its own; everything else goes on the stream.  Only on a path that answered a
  probe (``PROBE_TRIES`` tries, ``PROBE_TIMEOUT_S`` each; a blocked path is probed again after
  ``reprobe_after_s``).
* A message that would take more than one datagram goes zlib-compressed when that takes fewer datagrams
  (``compressed``; a 5.3 KB policy body of 52 rules: 1.1 KB, one datagram instead of five), to peers
  whose probe or probe answer carried ``FEATURE_ZLIB``; the receiver inflates it to at most
  ``MAX_FRAGMENTED`` bytes (``inflated``), after the datagram authenticated.  Each message is
  compressed on its own (no dictionary across messages), and only the authority-signed bodies every
  member receives are large enough to be compressed.
* Every datagram (frame or fragment) is retransmitted while unacknowledged: the wait after the k-th
  send is ``retry_after_s(rto, k)`` (a body's rto at most ``BODY_FIRST_RETRY_S``); after
  ``SEND_TRIES`` sends the whole message goes on the stream.
  ``rto_s`` is 3 x the smoothed round trip (``smoothed_rtt``), clamped to [``RTO_MIN_S``, ``RTO_MAX_S``].
"""

from __future__ import annotations

import struct
import zlib
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
BODY_TAGS: Final = frozenset({7, 9})  # PolicyPush, RootPush
BODY_FIRST_RETRY_S: Final = 0.01  # a body's retransmission timer at most (see retry_after_s)
RTO_MIN_S: Final = 0.005
RTO_MAX_S: Final = 0.5
RTO_INITIAL_S: Final = 0.1  # before the path's first round-trip sample
RTO_RTTS: Final = 3  # rto = this many smoothed round trips
SRTT_GAIN: Final = 0.125
PROBE_TRIES: Final = 3  # unanswered probes before the path counts as blocked
PROBE_TIMEOUT_S: Final = (0.1, 0.3, 0.9)  # per try (the first probe may beat the acceptor's end of the handshake)
REPROBE_MIN_S: Final = 0.5  # a blocked path is probed again after this (see reprobe_after_s)
REPROBE_FLAT_EPISODES: Final = 8  # ... for this many episodes, then doubling
REPROBE_MAX_S: Final = 30.0
UDP_IP_HEADER: Final = 28  # IPv4 + UDP, per datagram on the wire
FEATURE_ZLIB: Final = 0x01  # in the features byte after a probe's (or its answer's) id header
ZLIB_LEVEL: Final = 6


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


def reprobe_after_s(episodes: int) -> float:
    """How long a path waits after its ``episodes``-th blocked episode (3 unanswered probes) before it is
    probed again: ``REPROBE_MIN_S`` for the first ``REPROBE_FLAT_EPISODES`` (~15 s), then doubling up to
    ``REPROBE_MAX_S``.  A peer drops our datagrams until its own firewall lists us as a member (a new
    member, or every member at a cluster's start, until the directory has spread and been applied:
    seconds), so a path blocked at first is soon found; a path UDP never crosses costs 3 probes per
    1.8 s for that while, then fewer."""
    if episodes <= REPROBE_FLAT_EPISODES:
        return REPROBE_MIN_S
    return min(REPROBE_MAX_S, REPROBE_MIN_S * 2 ** (episodes - REPROBE_FLAT_EPISODES))


def rto_s(srtt_s: float | None) -> float:
    """The retransmission timeout of a path whose smoothed round trip is ``srtt_s`` (None: no sample yet)."""
    return RTO_INITIAL_S if srtt_s is None else min(RTO_MAX_S, max(RTO_MIN_S, RTO_RTTS * srtt_s))


def smoothed_rtt(srtt_s: float | None, sample_s: float) -> float:
    return sample_s if srtt_s is None else (1 - SRTT_GAIN) * srtt_s + SRTT_GAIN * sample_s


def is_body(data: bytes) -> bool:
    """A policy or root body (``BODY_TAGS``): what a version waits for on every hop."""
    return len(data) > 1 and data[1] in BODY_TAGS


def retry_after_s(rto: float, sends: int, body: bool = False) -> float:
    """How long an unacknowledged datagram waits after its ``sends``-th send (linear backoff): with
    ``SEND_TRIES`` = 3 the sends are at 0, rto, 3 rto and the message falls back to the stream at 6 rto.
    A body's timer is at most ``BODY_FIRST_RETRY_S`` (sends at 0, 10 and 30 ms, to the stream at 60 ms):
    the round trip is sampled from acknowledgements, which wait while either end's event loop is busy
    (an ``nft`` load, a burst of messages), so a busy moment inflates the timer for a while after (the
    12-node bench: 3 x SRTT up to 200 ms, and a body lost twice reached its subtree ~160 ms late); a lost
    body is sent again after a LAN's round trip plus a busy moment instead, at the cost of a duplicate
    (dropped by the receiver's ids) when its acknowledgement is slower than that."""
    if body:
        rto = min(rto, BODY_FIRST_RETRY_S)
    return rto * sends


def wire_bytes(payload: int) -> int:
    """Bytes on the wire of one sealed datagram carrying ``payload`` bytes after its id header."""
    return UDP_IP_HEADER + OVERHEAD + ID_HEADER.size + payload


_LAST_COMPRESSED: list[tuple[bytes, bytes | None]] = []  # the message compressed last, and its result


def compressed(data: bytes) -> bytes | None:
    """The zlib form of a message larger than one datagram, when it takes fewer datagrams than the message
    itself; None: the message goes as it is.

    The last message's result is kept: a node sends the same body to each of its tree children and to
    the peers that pull it (~0.5 ms of zlib per 5 KB policy body, each time).  A pure function of the bytes."""
    if len(data) <= MAX_FRAME:
        return None
    last = _LAST_COMPRESSED
    if last and last[0][0] == data:
        return last[0][1]
    packed = zlib.compress(data, ZLIB_LEVEL)
    result = packed if fragment_count(len(packed)) < fragment_count(len(data)) else None
    last[:] = [(bytes(data), result)]
    return result


def inflated(packed: bytes) -> bytes:
    """The message a compressed one carries: a ValueError for a broken stream, trailing bytes, or more
    than ``MAX_FRAGMENTED`` bytes of output (inflating stops there: a small datagram cannot make the
    receiver allocate more than the largest message it would take uncompressed)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(packed, MAX_FRAGMENTED)
    except zlib.error as exc:
        raise ValueError(f"not a zlib stream: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise ValueError("inflates beyond the largest datagram message, or is truncated or padded")
    return data


def sent_size(data: bytes) -> int:
    """Bytes a datagram-worthy message takes across the datagrams it goes as (compressed or not), to a
    peer that inflates."""
    packed = compressed(data)
    return len(data) if packed is None else len(packed)
