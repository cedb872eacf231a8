"""The established phase of a session on its own: `Transport` over two keyed CipherStates."""

from __future__ import annotations

import pytest

from protocol.channel import CHUNK_BYTES, MessageReceived, PeerClosed
from protocol.channel.errors import FrameError, PeerMessageTooLargeError
from protocol.channel.noise import CipherState, DecryptError
from protocol.channel.transport import Transport

A_TO_B, B_TO_A = bytes(range(32)), bytes(range(32, 64))


def pair(*, rekey_interval: int = 1 << 14, max_message_bytes: int = 1 << 20) -> tuple[Transport, Transport]:
    a = Transport(CipherState(A_TO_B), CipherState(B_TO_A), rekey_interval=rekey_interval,
                  max_message_bytes=max_message_bytes)
    b = Transport(CipherState(B_TO_A), CipherState(A_TO_B), rekey_interval=rekey_interval,
                  max_message_bytes=max_message_bytes)
    return a, b


def deliver(frames: list[bytes], to: Transport) -> list[MessageReceived | PeerClosed]:
    events = [to.receive(f) for f in frames]
    assert all(e is None for e in events[:-1])  # every frame but the last is a chunk of the message
    return [e for e in events if e is not None]


def test_messages_of_every_size_arrive_whole_across_rekeys() -> None:
    a, b = pair(rekey_interval=3)  # both directions rekey every third frame
    for message in (b"", b"x", bytes(CHUNK_BYTES), bytes(CHUNK_BYTES + 1), bytes(range(256)) * 1000):
        frames: list[bytes] = []
        a.write_message(message, frames)
        assert len(frames) == max(1, -(-len(message) // CHUNK_BYTES))
        assert deliver(frames, b) == [MessageReceived(message)]
        reply: list[bytes] = []
        b.write_message(message[::-1], reply)
        assert deliver(reply, a) == [MessageReceived(message[::-1])]


def test_a_peer_message_over_the_cap_is_refused_while_it_is_reassembled() -> None:
    a, b = pair(max_message_bytes=CHUNK_BYTES + 10)
    frames: list[bytes] = []
    a.write_message(bytes(2 * CHUNK_BYTES), frames)
    assert b.receive(frames[0]) is None
    with pytest.raises(PeerMessageTooLargeError):
        b.receive(frames[1])


def test_close_carries_its_reason_but_not_in_the_middle_of_a_message() -> None:
    a, b = pair()
    assert b.receive(a.close_frame(b"bye")) == PeerClosed("bye")
    frames: list[bytes] = []
    a.write_message(bytes(CHUNK_BYTES + 1), frames)
    assert b.receive(frames[0]) is None
    # a sender that closes instead of sending the message's last chunk (the same key and nonce)
    send = CipherState(A_TO_B)
    send.set_nonce(2)
    liar = Transport(send, CipherState(B_TO_A), rekey_interval=1 << 14, max_message_bytes=1 << 20)
    with pytest.raises(FrameError, match="middle of a chunked message"):
        b.receive(liar.close_frame(b""))


def test_a_replayed_or_reordered_frame_does_not_decrypt() -> None:
    a, b = pair()
    first: list[bytes] = []
    a.write_message(b"one", first)
    second: list[bytes] = []
    a.write_message(b"two", second)
    with pytest.raises(DecryptError):
        b.receive(second[0])  # out of order
    assert b.receive(first[0]) == MessageReceived(b"one")  # the failed decrypt left the nonce in place
    with pytest.raises(DecryptError):
        b.receive(first[0])  # replayed
