"""Hostile gossip frames: whatever an authenticated peer sends, decoding raises only RemoteProtocolError
(found by this test: invalid UTF-8 inside a string used to escape as UnicodeDecodeError)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.gossip.wire import Ack, Announce, Digest, Ping, PolicyPull, decode, decode_payload, encode

FRAMES = [
    encode(Ping(1, "node-a")),
    encode(Ack(7, (), 3, 1)),
    encode(Announce(Digest(5, b"\x01" * 32, 1))),
    encode(PolicyPull(5, b"\x02" * 32)),
]


def test_invalid_utf8_in_a_string_is_a_protocol_error():
    bad = FRAMES[0].replace(b"node-a", b"node-\x80")
    try:
        decode(bad)
    except RemoteProtocolError:
        return
    raise AssertionError("decoded a frame with invalid UTF-8")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FRAMES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_frames_raise_only_the_typed_error(frame, flips):
    b = bytearray(frame)
    for pos, val in flips:
        b[pos % len(b)] = val
    for fn in (decode, decode_payload):
        try:
            fn(bytes(b))
        except RemoteProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_the_typed_error(data):
    for fn in (decode, decode_payload):
        try:
            fn(data)
        except RemoteProtocolError:
            pass
