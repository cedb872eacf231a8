"""Baselines in the same engine: central pull (a configuration-management agent polling an authority
every T) and naive flooding of bodies.  Both verify signatures for real (``TrustedState``) and speak
the same ``handle(now, input) -> effects`` / ``next_deadline()`` shape as ``protocol.gossip.node.Node``.

Frames are MessagePack arrays whose first element is a tag >= 100 (above the gossip tags) so the
simulator can classify bytes (``simulations.wire``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec

from protocol.errors import TrustError
from protocol.gossip import (
    Enforce,
    FrameReceived,
    Now,
    PersistPolicy,
    PolicyResult,
    PolicySubmitted,
    Send,
    SendFailed,
    TimerFired,
    Verdict,
)
from protocol.trust import TrustedState

TAG_POLL, TAG_NOT_MODIFIED, TAG_BODY = 100, 101, 102
TAG_NAMES = {TAG_POLL: "poll", TAG_NOT_MODIFIED: "not_modified", TAG_BODY: "body"}
AUTHORITY_ID = "authority"
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _accept(trust: TrustedState, envelope: bytes, now: Now, source: str) -> list[Any]:
    try:
        chk = trust.accept_policy(envelope, now.wall)
    except TrustError as exc:
        return [PolicyResult(source, False, 0, Verdict.of(exc.reason), str(exc))]
    if chk.duplicate:
        return []
    return [PersistPolicy(chk.policy.serial, chk.envelope_bytes), Enforce(chk.policy, chk.hash, {})]


class AuthorityServer:
    """Serves the current signed policy; a poll carries the client's hash (If-None-Match)."""

    def __init__(self, request_pad: int, not_modified_bytes: int, overhead: int) -> None:
        self.envelope: bytes | None = None
        self.hash = b""
        self.not_modified = _enc.encode([TAG_NOT_MODIFIED, b"\0" * max(0, not_modified_bytes - 8)])
        self.overhead = b"\0" * overhead

    def publish(self, envelope: bytes, hash_hex: str) -> None:
        self.envelope = envelope
        self.hash = bytes.fromhex(hash_hex)

    def handle(self, now: Now, inp: Any) -> list[Any]:
        if isinstance(inp, FrameReceived):
            msg = _dec.decode(inp.data)
            if msg[0] == TAG_POLL:
                if self.envelope is None or msg[1] == self.hash:
                    return [Send(inp.peer, "", self.not_modified)]
                return [Send(inp.peer, "", _enc.encode([TAG_BODY, self.envelope, self.overhead]))]
        return []

    def next_deadline(self) -> int | None:
        return None


class CentralPullAgent:
    """Polls the authority every ``interval_ms`` (first poll at a random splay), like chef-client."""

    def __init__(self, trust: TrustedState, authority_address: str, interval_ms: int, request_bytes: int,
                 rng: random.Random) -> None:
        self.trust = trust
        self.address = authority_address
        self.interval_ms = interval_ms
        self.rng = rng
        self.pad = b"\0" * max(0, request_bytes - 40)
        self._next: int | None = None

    def handle(self, now: Now, inp: Any) -> list[Any]:
        out: list[Any] = []
        if self._next is None:
            self._next = now.ms + self.rng.randrange(self.interval_ms)
        if isinstance(inp, FrameReceived):
            msg = _dec.decode(inp.data)
            if msg[0] == TAG_BODY:
                out += _accept(self.trust, msg[1], now, AUTHORITY_ID)
        elif isinstance(inp, PolicySubmitted):
            out += _accept(self.trust, inp.envelope, now, inp.source)
        elif isinstance(inp, (TimerFired, SendFailed)) and now.ms >= self._next:
            self._next = now.ms + self.interval_ms
            h = bytes.fromhex(self.trust.policy_hash) if self.trust.policy_hash else b""
            out.append(Send(AUTHORITY_ID, self.address, _enc.encode([TAG_POLL, h, self.pad])))
        return out

    def next_deadline(self) -> int | None:
        return self._next


class FloodNode:
    """Naive flooding: on first receipt, push the whole envelope to ``fanout`` random peers, and again
    for ``rounds`` rounds; no digests, no pulls, no anti-entropy (membership is handed in, static).

    ``peers`` may be one list shared by every node (all nodes, this one included at ``self_index``):
    the node then samples positions in it, skipping its own, instead of holding an O(n) copy."""

    def __init__(self, trust: TrustedState, node_id: str, peers: list[tuple[str, str]], fanout: int,
                 rounds: int, interval_ms: int, rng: random.Random, self_index: int | None = None) -> None:
        self.trust = trust
        self.node_id = node_id
        if self_index is None:
            peers = [p for p in peers if p[0] != node_id]
        else:
            assert peers[self_index][0] == node_id
        self.peers = peers
        self.skip = len(peers) if self_index is None else self_index
        self.npeers = len(peers) if self_index is None else len(peers) - 1
        self.fanout = fanout
        self.rounds = rounds
        self.interval_ms = interval_ms
        self.rng = rng
        self._left = 0
        self._next: int | None = None

    def _round(self, now: Now) -> list[Any]:
        env = self.trust.policy_bytes
        if env is None or self._left <= 0:
            self._next = None
            return []
        self._left -= 1
        self._next = now.ms + self.interval_ms if self._left > 0 else None
        data = _enc.encode([TAG_BODY, env])
        # sample() picks by position only, so sampling positions of the list without this node
        # draws exactly what sampling that list would
        peers, skip = self.peers, self.skip
        out: list[Any] = []
        for k in self.rng.sample(range(self.npeers), min(self.fanout, self.npeers)):
            pid, addr = peers[k if k < skip else k + 1]
            out.append(Send(pid, addr, data))
        return out

    def handle(self, now: Now, inp: Any) -> list[Any]:
        out: list[Any] = []
        if isinstance(inp, FrameReceived):
            msg = _dec.decode(inp.data)
            if msg[0] == TAG_BODY:
                out += _accept(self.trust, msg[1], now, inp.peer)
        elif isinstance(inp, PolicySubmitted):
            out += _accept(self.trust, inp.envelope, now, inp.source)
        if any(isinstance(e, Enforce) for e in out):
            self._left = self.rounds
            out += self._round(now)
        elif isinstance(inp, TimerFired) and self._next is not None and now.ms >= self._next:
            out += self._round(now)
        return out

    def next_deadline(self) -> int | None:
        return self._next


# -- convergence models (for comparison in reports, sweeps and plots) --------------------------------
SERF_GOSSIP_INTERVAL_MS = 200  # memberlist DefaultLANConfig.GossipInterval
SERF_MISS = 1e-4  # converged: every node reached with probability 99.99% (expected nodes missed <= 1e-4)
MIN_RTO_MS = 200  # Linux


def serf_model_ms(n: int, loss: float, fanout: int = 3, interval_ms: int = SERF_GOSSIP_INTERVAL_MS) -> int:
    """The Serf/memberlist convergence model (as its convergence simulator): every gossip interval each
    informed node sends to ``fanout`` random nodes, each message lost with probability ``loss``; the
    mean-field count of informed nodes grows until the expected number of nodes missed falls to
    ``SERF_MISS``.  Whole gossip rounds: 2,400 ms at 1,000 nodes and 10% loss (the report's fixed anchor
    is 2,390 ms)."""
    if n <= 1:
        return 0
    informed, rounds = 1.0, 0
    p = fanout / n * (1.0 - loss)
    while n - informed > SERF_MISS and rounds < 10_000:
        informed += (n - informed) * (1.0 - (1.0 - p) ** informed)
        rounds += 1
    return rounds * interval_ms


def ln_floor_ms(n: int, loss: float, one_way_ms: float) -> int:
    """The floor of any epidemic dissemination: about ln N hops of one (mean) one-way latency each,
    plus one TCP retransmission timeout on the way when messages are lost."""
    return int(round(math.log(max(n, 2)) * (one_way_ms + 1.0) + (MIN_RTO_MS if loss > 0 else 0)))
