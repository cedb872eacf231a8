"""The daemon's datagram layer as the simulator models it (``[network] transport = "mixed"``).

What goes as datagrams, fragment sizes, the retransmission timer and the number of sends come from
``protocol.channel.datagram_policy``, the module the daemon (``meshnode/daemon/datagrams.py``) uses:

* A path: once a pair's connection is up, the dialer probes the peer's UDP endpoint; a probe is
  answered with probability (1 - loss)^2 (probe and answer), else tried again after ``PROBE_TIMEOUT_S``,
  and after ``PROBE_TRIES`` the path is blocked until a re-probe ``reprobe_after_s`` later.  The
  acceptor learns the endpoint from the dialer's first probe that arrives and probes back the same way.
  Each side sends datagrams once its own probe was answered (``probe_up_at``).
* A message (``datagram_plan``): ``fragment_count`` datagrams, each lost independently (the loss of the
  moment, a cut, a dead receiver), each arriving after one-way latency with jitter plus serialisation,
  each acknowledged (the ack lost independently too).  An unacknowledged datagram is sent again after
  ``retry_after_s(rto, sends, body)``, with rto from the path's round trip (2 x one-way latency, jitter on
  average) by the daemon's rule; after ``SEND_TRIES`` sends without an ack the whole message goes on the
  stream (the TCP model) at that moment.  The message is delivered when every fragment has arrived once
  (a message that arrived but whose acks were all lost is delivered twice, as by the daemon).  Every
  datagram and ack that arrives is counted as bytes received (``wire_bytes``: IPv4 + UDP + seal + id).

All randomness comes from the network's ``random.Random``; every time is integer milliseconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from protocol.channel.datagram_policy import (
    FRAG_HEADER,
    MAX_FRAME,
    PROBE_TIMEOUT_S,
    PROBE_TRIES,
    SEND_TRIES,
    fragment_count,
    reprobe_after_s,
    retry_after_s,
    rto_s,
    wire_bytes,
)

from .scenario import NetworkCfg


class Network(Protocol):
    """What the datagram model reads of the network model (``simulations.network.Network``, which
    imports this module): its latency, loss, reachability and the seeded generator."""

    cfg: NetworkCfg
    rng: random.Random
    up: list[bool]
    bits_per_ms: float

    def one_way(self, a: int, b: int) -> float: ...

    def loss_at(self, t: int) -> float: ...

    def reachable(self, a: int, b: int, t: int) -> bool: ...

NEVER = 1 << 62
ACK_BYTES = wire_bytes(0)  # an ack: the id header alone
_REPROBE_EPISODES = 24  # beyond this a path counts as never up


@dataclass(slots=True)
class Plan:
    """One message sent as datagrams: when it is delivered (NEVER: some fragment never arrived), when it
    falls back to the stream (NEVER: every datagram was acknowledged in time), and every datagram and
    ack that arrived as (time, receiving node, wire bytes)."""

    deliver_at: int = NEVER
    fallback_at: int = NEVER
    arrivals: list[tuple[int, int, int]] = field(default_factory=list)
    fragments: int = 1
    sends: int = 0  # datagrams sent, retransmissions included
    acks: int = 0  # acks sent: one per datagram that arrived (copies included)


def path_rto_ms(net: Network, a: int, b: int) -> float:
    """The retransmission timeout the daemon settles on for this path: 3 x its round trip, clamped."""
    srtt_ms = 2 * net.one_way(a, b) * (1.0 + net.cfg.jitter / 2)
    return 1000.0 * rto_s(srtt_ms / 1000.0)


def _probe_answered(net: Network, src: int, dst: int, t: float) -> float | None:
    """When the answer to a probe ``src`` sends at ``t`` comes back, or None if probe or answer is lost."""
    rng = net.rng
    loss = net.loss_at(int(t))
    if not (net.reachable(src, dst, int(t)) and net.up[dst]) or rng.random() < loss or rng.random() < loss:
        return None  # the probe or its answer is lost
    lat = net.one_way(src, dst)
    return t + lat * (2.0 + net.cfg.jitter * (rng.random() + rng.random()))


def _first_answer(net: Network, src: int, dst: int, t: float) -> float:
    """When ``src``'s path to ``dst`` is up if it starts probing at ``t`` (NEVER: not within the episodes)."""
    for episode in range(1, _REPROBE_EPISODES + 1):
        for k in range(PROBE_TRIES):
            answered = _probe_answered(net, src, dst, t)
            if answered is not None:
                return answered
            t += PROBE_TIMEOUT_S[min(k, len(PROBE_TIMEOUT_S) - 1)] * 1000
        t += reprobe_after_s(episode) * 1000  # blocked after the last probe's timeout: probed again later
    return NEVER


def probe_up_at(net: Network, dialer: int, acceptor: int, ready: int) -> tuple[int, int]:
    """When the dialer's and the acceptor's datagram paths are up, for a connection ready at ``ready``."""
    up_dialer = _first_answer(net, dialer, acceptor, float(ready))
    # the acceptor learns the endpoint from the dialer's first probe to arrive (about half its answer)
    learned = ready + (up_dialer - ready) / 2 if up_dialer != NEVER else NEVER
    up_acceptor = _first_answer(net, acceptor, dialer, learned) if learned != NEVER else NEVER
    return (int(up_dialer) + 1 if up_dialer != NEVER else NEVER,
            int(up_acceptor) + 1 if up_acceptor != NEVER else NEVER)


def datagram_plan(net: Network, src: int, dst: int, size: int, t: int, body: bool = False) -> Plan:
    """Send a datagram-worthy message of ``size`` bytes (as sent: compressed when that saves datagrams)
    from ``src`` to ``dst`` at ``t`` (path up); ``body``: a policy or root body (its first wait is shorter)."""
    rng = net.rng
    lat = net.one_way(src, dst)
    jitter = net.cfg.jitter
    rto = path_rto_ms(net, src, dst)
    count = fragment_count(size)
    chunk = MAX_FRAME - FRAG_HEADER.size
    plan = Plan(fragments=count)
    last = 0.0  # the latest first arrival over the fragments
    lost = False  # some fragment never arrived
    for f in range(count):
        payload = size if count == 1 else FRAG_HEADER.size + min(chunk, size - f * chunk)
        nbytes = wire_bytes(payload)
        wire_ms = nbytes * 8 / net.bits_per_ms
        send_at = float(t)
        first = float(NEVER)
        acked = float(NEVER)
        for k in range(1, SEND_TRIES + 1):
            if k > 1 and acked <= send_at:
                break
            plan.sends += 1
            at = int(send_at)
            if net.reachable(src, dst, at) and net.up[dst] and rng.random() >= net.loss_at(at):
                arrive = send_at + lat * (1.0 + jitter * rng.random()) + wire_ms
                plan.arrivals.append((int(arrive) + 1, dst, nbytes))
                first = min(first, arrive)
                plan.acks += 1
                back = int(arrive)
                if net.reachable(dst, src, back) and net.up[src] and rng.random() >= net.loss_at(back):
                    ack = arrive + lat * (1.0 + jitter * rng.random())
                    plan.arrivals.append((int(ack) + 1, src, ACK_BYTES))
                    acked = min(acked, ack)
            send_at += 1000.0 * retry_after_s(rto / 1000.0, k, body)
        if acked > send_at:  # no ack before the last timer: the whole message goes on the stream
            plan.fallback_at = min(plan.fallback_at, int(send_at) + 1)
        if first == NEVER:
            lost = True
        else:
            last = max(last, first)
    if not lost:
        plan.deliver_at = int(last) + 1
    return plan
