"""Policy bodies as datagrams: compressed, a lost one sent again soon, and the apply waiting for them.

Compressed dissemination datagrams: a body that would take several datagrams goes zlib-compressed when
that takes fewer (a policy body: one datagram instead of five), only to a peer whose probe said it
inflates; inflating is bounded (a small datagram never makes the receiver hold more than the largest
message it would take uncompressed) and a broken or oversize stream is refused and counted, never fed.

Two datagram layers of the daemon (``DatagramPaths``) talk through in-memory transports, with the keys
of a real Noise XX handshake; the channels they belong to are stand-ins carrying only those keys."""

from __future__ import annotations

import asyncio
import os
import zlib
from types import SimpleNamespace
from typing import Any

import pytest

from meshnode.daemon import datagrams as dg
from meshnode.metrics import Metrics
from protocol.channel.datagram import derive_keys
from protocol.channel.datagram_policy import (
    BODY_FIRST_RETRY_S,
    MAX_FRAGMENTED,
    MAX_FRAME,
    PROBE_TIMEOUT_S,
    compressed,
    inflated,
    sent_size,
)
from protocol.gossip.events import FrameReceived
from tests.test_datagram import handshake

PUSH = bytes([0x93, 7])  # a MessagePack array of 3 whose first element is PolicyPush's tag


def body(size: int) -> bytes:
    """A dissemination message as compressible as a policy document (repeated rule text, some noise)."""
    rules = b"".join(b'[[allow]] name = "rule-%d" from = ["role:app"] to = ["role:db"] ports = ["tcp/%d"] '
                     % (k, 5000 + k) + os.urandom(4).hex().encode() for k in range(size // 80 + 1))
    return PUSH + rules[:size - len(PUSH)]


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Wire:
    """An in-memory UDP transport: what was sent, delivered on request."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


class _Channel:
    """Stands in for the authenticated gossip channel a path belongs to: its peer and datagram keys."""

    def __init__(self, peer: str, keys: Any) -> None:
        self.peer = peer
        self.closed = False
        self.session = SimpleNamespace(datagram_keys=lambda: keys)


class Side:
    def __init__(self, name: str, peer: str, keys: Any, addr: tuple[str, int], features: bool = True) -> None:
        self.addr = addr
        self.now = 100.0
        self.fed: list[tuple[FrameReceived, dict[str, Any]]] = []
        self.wire = _Wire()
        self.paths = dg.DatagramPaths(feed=lambda ev, origin=None: self.fed.append((ev, origin or {})),
                                      stream_send=lambda c, d: self.streamed.append(d), metrics=Metrics(),
                                      log=_Log(), clock=lambda: self.now)
        self.now = 100.0
        self.streamed: list[bytes] = []
        self.paths.connection_made(self.wire)  # type: ignore[arg-type]
        if not features:  # an older node: no features byte after its probes or probe answers
            seal = self.paths._seal_to

            def old_seal(path: Any, payload: bytes) -> None:
                kind = payload[0]
                seal(path, payload[:dg._ID.size] if kind in (dg.PROBE, dg.PROBE_ACK) else payload)

            self.paths._seal_to = old_seal  # type: ignore[method-assign]
        self.conn = _Channel(peer, keys)


def pair(features_a: bool = True, features_b: bool = True) -> tuple[Side, Side]:
    i, r = handshake()
    a = Side("a", "node-b", derive_keys(i.exporter_secret, True), ("10.0.0.1", 7946), features_a)
    b = Side("b", "node-a", derive_keys(r.exporter_secret, False), ("10.0.0.2", 7946), features_b)
    a.paths.attach(a.conn, b.addr)  # type: ignore[arg-type]  # the dialer knows the peer's endpoint
    b.paths.attach(b.conn, None)  # type: ignore[arg-type]
    return a, b


def deliver(a: Side, b: Side) -> int:
    """Deliver every datagram in flight both ways until none is left; how many went from a to b."""
    count = 0
    while a.wire.sent or b.wire.sent:
        for src, dst in ((a, b), (b, a)):
            out, src.wire.sent = src.wire.sent, []
            for data, _ in out:
                count += src is a
                dst.paths.datagram_received(data, src.addr)
    return count


def test_a_policy_sized_body_goes_compressed_as_one_datagram_and_arrives_exactly() -> None:
    a, b = pair()
    deliver(a, b)  # the probes: both paths up, each knows the other inflates
    message = body(5300)
    assert len(message) > 4 * MAX_FRAME and len(compressed(message) or b"") <= MAX_FRAME
    assert a.paths.send(a.conn, message)  # type: ignore[arg-type]
    assert deliver(a, b) == 1
    assert [(ev.peer, ev.data) for ev, _ in b.fed] == [("node-a", message)]
    assert b.fed[0][1] == {"peer": "node-a", "via": "datagram", "compressed": True}
    assert a.paths.counts["compressed"] == 1 and a.paths.counts["fragmented"] == 0 and not a.paths._pending


def test_a_larger_body_goes_compressed_in_fewer_fragments() -> None:
    a, b = pair()
    deliver(a, b)
    message = body(MAX_FRAGMENTED - 100)
    assert deliver(a, b) == 0 and a.paths.send(a.conn, message)  # type: ignore[arg-type]
    sent = deliver(a, b)
    assert 2 <= sent < -(-len(message) // MAX_FRAME)
    assert [ev.data for ev, _ in b.fed] == [message] and b.fed[0][1]["via"] == "fragments"


def test_an_incompressible_body_and_an_older_peer_get_plain_fragments() -> None:
    a, b = pair()
    deliver(a, b)
    noise = PUSH + os.urandom(3000)
    assert compressed(noise) is None and sent_size(noise) == len(noise)
    assert a.paths.send(a.conn, noise)  # type: ignore[arg-type]
    assert deliver(a, b) == 3 and [ev.data for ev, _ in b.fed] == [noise]
    old_a, new_b = pair(features_a=False)  # an older node: no features in its probes and answers
    deliver(old_a, new_b)
    message = body(5300)
    assert new_b.paths.send(new_b.conn, message)  # type: ignore[arg-type]
    assert deliver(new_b, old_a) == 5 and new_b.paths.counts["compressed"] == 0
    assert [ev.data for ev, _ in old_a.fed] == [message] and old_a.fed[0][1]["via"] == "fragments"


def test_inflating_is_bounded_and_a_broken_stream_is_refused_and_counted() -> None:
    bomb = zlib.compress(bytes(50 * MAX_FRAGMENTED), 9)
    assert len(bomb) < MAX_FRAME
    for bad in (bomb, zlib.compress(body(3000))[:-5], zlib.compress(body(3000)) + b"x", b"not zlib"):
        with pytest.raises(ValueError):
            inflated(bad)
    a, b = pair()
    deliver(a, b)
    path = a.paths._by_conn[a.conn]  # type: ignore[index]
    a.paths._seal_to(path, dg._ID.pack(dg.ZFRAME, 999) + bomb)  # an authenticated peer sends a bomb
    deliver(a, b)
    assert b.paths.refused == {"inflate_failed": 1} and b.fed == []
    assert a.paths.send(a.conn, body(5300)) and deliver(a, b) == 1 and len(b.fed) == 1  # type: ignore[arg-type]


def test_a_probe_answer_is_never_larger_than_the_probe() -> None:
    for features in (True, False):
        a, b = pair(features_a=features)
        probe = a.wire.sent[0][0]
        b.paths.datagram_received(probe, a.addr)
        assert len(b.wire.sent[-1][0]) == len(probe)  # the answer (after b's own first probe to a)


def test_a_lost_body_is_sent_again_soon_whatever_the_paths_timer_says() -> None:
    """The round trip behind the timer is sampled from acks, which wait while a busy loop (an ``nft``
    load) holds them: a lost body is sent again ``BODY_FIRST_RETRY_S`` later (and twice that after), a
    lost announce after the path's timer."""
    a, b = pair()
    deliver(a, b)
    path = a.paths._by_conn[a.conn]  # type: ignore[index]
    path.srtt_s = 0.1  # inflated by a busy moment: rto 300 ms
    for message, wait in ((body(5300), BODY_FIRST_RETRY_S), (bytes([0x92, 5]) + bytes(40), path.rto_s)):
        # a body: sent again 10 ms after, and 20 ms after that; an announce after the path's timer
        assert a.paths.send(a.conn, message)  # type: ignore[arg-type]
        a.wire.sent.clear()  # lost
        a.now += wait - 0.001
        a.paths.tick()
        assert a.wire.sent == []
        a.now += 0.002
        a.paths.tick()
        assert len(a.wire.sent) == 1 and a.paths.counts["retransmits"] >= 1
        deliver(a, b)
        assert b.fed[-1][0].data == message and not a.paths._pending


def test_a_late_probe_answer_still_puts_the_path_up_without_a_round_trip_sample() -> None:
    """A peer busy at start answers a probe after its timeout, even after the path counted as blocked:
    the answer proves the path (authentic, to a nonce we sent), so bodies need not wait for a re-probe
    on the stream; the late round trip is not taken as the path's."""
    a, b = pair()
    first = a.wire.sent.pop()
    for timeout in PROBE_TIMEOUT_S:
        a.now += timeout + 0.001
        a.paths.tick()
    path = a.paths._by_conn[a.conn]  # type: ignore[index]
    assert not path.up and a.paths.status()["peers_stream_only"] == ["node-b"]
    a.wire.sent.clear()  # the later probes are lost too
    b.paths.datagram_received(first[0], a.addr)
    deliver(a, b)
    assert path.up and path.srtt_s is None and a.paths.status()["peers_datagram"] == ["node-b"]


def test_the_enforcer_can_wait_for_the_bodies_pushed_on_but_not_longer_than_asked() -> None:
    """An apply holds the event loop: the enforcer first waits until this node's pushes are acknowledged
    (so a lost one's retransmission is not held up behind the apply), at most the time it asks for."""
    a, b = pair()
    deliver(a, b)

    async def scenario() -> None:
        assert not a.paths.bodies_in_flight()
        await asyncio.wait_for(a.paths.bodies_delivered(10.0), 1.0)  # nothing in flight: no wait
        assert a.paths.send(a.conn, bytes([0x92, 5]) + bytes(40))  # an announce is no body  # type: ignore[arg-type]
        assert a.paths.send(a.conn, body(5300))  # type: ignore[arg-type]
        assert a.paths.bodies_in_flight()
        await asyncio.wait_for(a.paths.bodies_delivered(0.05), 5.0)  # unacknowledged: gives up as asked
        assert a.paths.bodies_in_flight()
        waiter = asyncio.ensure_future(a.paths.bodies_delivered(30.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        deliver(a, b)  # the acks arrive: the waiter returns at once
        await asyncio.wait_for(waiter, 5.0)
        assert not a.paths.bodies_in_flight() and len(b.fed) == 2
        # A lost body's second send also ends the wait (its acknowledgement may be slow to come).
        assert a.paths.send(a.conn, body(5300))  # type: ignore[arg-type]
        a.wire.sent.clear()
        waiter = asyncio.ensure_future(a.paths.bodies_delivered(30.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        a.now += BODY_FIRST_RETRY_S + 0.001
        a.paths.tick()
        await asyncio.sleep(0.01)
        assert not waiter.done() and len(a.wire.sent) == 1  # sent again; once more to come
        a.now += 2 * BODY_FIRST_RETRY_S
        a.paths.tick()
        await asyncio.wait_for(waiter, 5.0)
        assert len(a.wire.sent) == 2 and not a.paths.bodies_in_flight()

    asyncio.run(scenario())


def test_the_same_body_to_several_peers_is_compressed_once_and_arrives_exactly_at_each() -> None:
    """A node pushes one body to each tree child: the zlib form of the last message is reused (the same
    bytes give the same datagrams), and a different message is compressed on its own."""
    message, other = body(5300), body(5300)
    assert message != other
    packed = compressed(message)
    assert packed is not None and compressed(bytes(message)) is packed
    assert inflated(compressed(other) or b"") == other and inflated(compressed(message) or b"") == message
    for _ in range(2):
        a, b = pair()
        deliver(a, b)
        assert a.paths.send(a.conn, message)  # type: ignore[arg-type]
        assert deliver(a, b) == 1 and [ev.data for ev, _ in b.fed] == [message]
