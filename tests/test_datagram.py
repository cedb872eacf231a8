"""Encrypted datagrams (protocol.channel.datagram): keys from a real Noise XX handshake, sealing and opening,
and every refusal counted by reason: replayed, too old, forged, truncated, oversize, another session."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel.datagram import (
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    OVERHEAD,
    REPLAY_WINDOW,
    DatagramChannel,
    DatagramRefused,
    ReplayWindow,
    derive_keys,
    receiver_id,
)
from protocol.channel.noise import DecryptError, NoiseXX, OutOfTurnError
from protocol.errors import LocalProtocolError


def handshake() -> tuple[NoiseXX, NoiseXX]:
    i = NoiseXX(True, static_private=os.urandom(32), entropy=os.urandom)
    r = NoiseXX(False, static_private=os.urandom(32), entropy=os.urandom)
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    r.read_message(i.write_message())
    assert i.complete and r.complete
    return i, r


def pair() -> tuple[DatagramChannel, DatagramChannel]:
    i, r = handshake()
    return DatagramChannel(derive_keys(i.exporter_secret, True)), DatagramChannel(derive_keys(r.exporter_secret, False))


def refused(ch: DatagramChannel, data: bytes) -> str:
    with pytest.raises(DatagramRefused) as info:
        ch.open(data)
    return info.value.reason


def test_keys_agree_per_direction_and_differ_from_the_stream_and_between_sessions():
    i, r = handshake()
    ki, kr = derive_keys(i.exporter_secret, True), derive_keys(r.exporter_secret, False)
    assert ki.send_key == kr.recv_key and ki.recv_key == kr.send_key and ki.send_key != ki.recv_key
    assert ki.send_id == kr.recv_id and ki.recv_id == kr.send_id and ki.send_id != ki.recv_id
    # Not the stream's keys: the peer's stream cipher (same nonce 0, same associated data) cannot open it.
    sealed = DatagramChannel(ki).seal(b"x")
    _, recv_stream = r.split()
    with pytest.raises(DecryptError):
        recv_stream.decrypt(sealed[:17], sealed[17:])
    i2, _ = handshake()
    assert derive_keys(i2.exporter_secret, True).send_key != ki.send_key


def test_exporter_secret_only_after_the_handshake():
    i = NoiseXX(True, static_private=os.urandom(32), entropy=os.urandom)
    with pytest.raises(OutOfTurnError):
        _ = i.exporter_secret


def test_round_trip_both_ways_with_reordering_inside_the_window():
    a, b = pair()
    sealed = [a.seal(f"m{k}".encode()) for k in range(50)]
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert [b.open(sealed[k]) for k in order] == [f"m{k}".encode() for k in order]
    assert a.open(b.seal(b"back")) == b"back"
    assert receiver_id(sealed[0]) == b.keys.recv_id
    assert len(a.seal(bytes(MAX_PAYLOAD))) == MAX_DATAGRAM == MAX_PAYLOAD + OVERHEAD


def test_replayed_forged_truncated_and_foreign_datagrams_are_refused_with_a_reason():
    a, b = pair()
    d = a.seal(b"probe")
    assert b.open(d) == b"probe"
    assert refused(b, d) == "replayed"
    forged = bytearray(a.seal(b"announce"))
    forged[-1] ^= 1
    assert refused(b, bytes(forged)) == "forged"
    header_changed = bytearray(a.seal(b"x"))
    header_changed[10] ^= 1  # the counter is authenticated (associated data)
    assert refused(b, bytes(header_changed)) == "forged"
    assert refused(b, d[:OVERHEAD - 1]) == "truncated"
    assert refused(b, bytes([2]) + d[1:]) == "bad_type"
    assert refused(b, d + bytes(MAX_DATAGRAM)) == "oversize"
    other, _ = pair()
    assert refused(b, other.seal(b"x")) == "unknown_session"
    # A forged datagram with a far-ahead counter does not move the window: later honest ones pass.
    ahead = bytearray(a.seal(b"y"))
    ahead[9:17] = (10**9).to_bytes(8, "little")
    assert refused(b, bytes(ahead)) == "forged"
    assert b.open(a.seal(b"still fine")) == b"still fine"
    with pytest.raises(LocalProtocolError):
        a.seal(bytes(MAX_PAYLOAD + 1))


def test_a_counter_older_than_the_window_is_refused():
    a, b = pair()
    first = a.seal(b"old")
    for _ in range(REPLAY_WINDOW):
        b.open(a.seal(b"n"))
    assert refused(b, first) == "too_old"


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=300), st.integers(64, 512))
@settings(max_examples=150, deadline=None)
def test_property_replay_window_accepts_each_counter_at_most_once_and_never_an_old_one(counters, size):
    w = ReplayWindow(size)
    accepted: set[int] = set()
    top = -1
    for c in counters:
        why = w.check(c)
        if why is None:
            w.mark(c)
            assert c not in accepted
            assert c > top - size
            accepted.add(c)
            top = max(top, c)
        else:
            assert why in ("replayed", "too_old")
            assert (c in accepted) == (why == "replayed") or why == "too_old"
            assert why != "too_old" or c <= top - size


@given(st.binary(min_size=0, max_size=MAX_DATAGRAM + 8))
@settings(max_examples=200, deadline=None)
def test_property_arbitrary_bytes_never_open(junk):
    _, b = pair()
    with pytest.raises(DatagramRefused):
        b.open(junk)
