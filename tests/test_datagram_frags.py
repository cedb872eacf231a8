"""Fragments of dissemination messages larger than one datagram: split and reassembled in any order,
duplicates harmless, contradicting or malformed fragments refused with a reason, and what one peer can
keep half-assembled bounded in count and time."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.daemon.datagram_frags import (
    FRAG_HEADER,
    MAX_FRAGMENTS,
    MAX_PARTIAL,
    PARTIAL_TTL_S,
    FragmentRefused,
    Reassembly,
    max_message,
    split,
)
from meshnode.daemon.datagrams import MAX_FRAGMENTED, MAX_FRAME, datagram_worthy
from protocol.gossip.wire import Ack, Nack, Ping, PingReq, Sync, encode

FRAME = 1191


@given(st.integers(FRAME + 1, max_message(FRAME)), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_any_order_with_duplicates_gives_the_message_once(size: int, rnd: random.Random) -> None:
    message = os.urandom(size)
    frags = split(message, 7, FRAME)
    assert 2 <= len(frags) <= MAX_FRAGMENTS and all(len(f) <= FRAME for f in frags)
    shuffled = frags + rnd.sample(frags, k=len(frags) // 2)
    rnd.shuffle(shuffled)
    r = Reassembly()
    out = [m for f in shuffled if (m := r.add(f, 0.0)) is not None]
    assert out == [message] and not r.partial


def test_contradicting_and_malformed_fragments_are_refused() -> None:
    r = Reassembly()
    frags = split(os.urandom(3000), 9, FRAME)
    r.add(frags[0], 0.0)
    for bad, reason in [(FRAG_HEADER.pack(9, 0, 5) + b"x", "fragment_mismatch"),
                        (FRAG_HEADER.pack(10, 3, 3) + b"x", "fragment_malformed"),
                        (FRAG_HEADER.pack(10, 0, 1) + b"x", "fragment_malformed"),
                        (FRAG_HEADER.pack(10, 0, MAX_FRAGMENTS + 1) + b"x", "fragment_malformed"),
                        (b"\x01\x02", "fragment_malformed")]:
        with pytest.raises(FragmentRefused) as e:
            r.add(bad, 0.0)
        assert e.value.reason == reason
    assert [m for f in frags[1:] if (m := r.add(f, 0.0)) is not None]  # the honest message still completes


def test_half_assembled_messages_are_bounded_in_number_and_time() -> None:
    r = Reassembly()
    for mid in range(1, 3 * MAX_PARTIAL):
        r.add(split(os.urandom(2000), mid, FRAME)[0], 0.0)
        assert len(r.partial) <= MAX_PARTIAL
    r.add(split(os.urandom(2000), 100, FRAME)[0], PARTIAL_TTL_S + 1)
    assert list(r.partial) == [100]


def test_which_messages_travel_as_datagrams() -> None:
    push = bytes([0x93, 7])  # a MessagePack array of 3 whose first element is PolicyPush's tag
    assert datagram_worthy(push + bytes(MAX_FRAME - 2)) and datagram_worthy(push + bytes(MAX_FRAGMENTED - 2))
    assert not datagram_worthy(push + bytes(MAX_FRAGMENTED))  # larger bodies stay on the stream
    assert not datagram_worthy(bytes([0x9F, 10]) + bytes(100))  # a Sync: on the stream
    # SWIM probes and their answers too: on the stream a lost segment waits for TCP's 200 ms timer
    for msg in (Ping(7, "n2", serial=3), Ack(7, serial=3), PingReq(8, "n3", "10.0.0.3:7946"), Nack(8)):
        assert datagram_worthy(encode(msg)), msg
    assert not datagram_worthy(encode(Sync(False, None, 0, b"", b"", None, None)))


class _Log:
    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


def test_unauthenticated_datagrams_are_rate_limited_counted_and_never_answered() -> None:
    """Before any crypto: a source over its rate is refused as ``rate_limited``; junk and forged
    datagrams are refused with their reason; nothing is ever sent back (no amplification)."""
    from meshnode.daemon import datagrams as dg
    from meshnode.metrics import Metrics

    now = [100.0]
    paths = dg.DatagramPaths(feed=lambda ev: None, stream_send=lambda c, d: None, metrics=Metrics(), log=_Log(),
                             clock=lambda: now[0])
    transport = _Transport()
    paths.connection_made(transport)  # type: ignore[arg-type]
    junk = [b"", b"\x01", bytes([1]) + os.urandom(8) + bytes(8) + os.urandom(40)]
    for i in range(dg.SOURCE_BURST + 500):
        paths.datagram_received(junk[i % len(junk)], ("10.9.9.9", 4000))
    assert paths.refused["rate_limited"] >= 500 - 1
    assert paths.refused["truncated"] > 0 and paths.refused["unknown_session"] > 0
    assert transport.sent == []
