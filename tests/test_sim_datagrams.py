"""The simulator's model of the daemon's datagram layer (``[network] transport = "mixed"``,
simulations/datagrams.py): one datagram per small message, acknowledged and retransmitted on the
daemon's timer, fragments for bodies up to ~18 KB, the stream after the last try, acks counted."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.daemon import datagrams as daemon_datagrams
from protocol.channel.datagram import MAX_DATAGRAM
from protocol.channel.datagram_policy import (
    MAX_FRAGMENTED,
    MAX_FRAME,
    SEND_TRIES,
    UDP_IP_HEADER,
    datagram_worthy,
    fragment_count,
    retry_after_s,
    rto_s,
    wire_bytes,
)
from protocol.gossip import FrameReceived
from simulations.datagrams import ACK_BYTES, NEVER, datagram_plan, path_rto_ms, probe_up_at
from simulations.engine import run_scenario
from simulations.kernel import SEQ_BITS
from simulations.network import Network
from simulations.scenario import NetworkCfg, ScenarioError, TcpCfg, from_dict, load, override

ONE_WAY_MS = 10.0


def _net(loss: float = 0.0, jitter: float = 0.0, seed: int = 1) -> Network:
    cfg = NetworkCfg(transport="mixed", loss=loss, jitter=jitter, intra_region_ms=ONE_WAY_MS)
    net = Network(cfg, TcpCfg(), ["lan"], [0, 0], random.Random(seed))
    net.up, net.host_up, net.epoch = [True, True], [True, True], [0, 0]
    return net


def _fallback_ms(rto: float) -> float:
    return sum(retry_after_s(rto, k) for k in range(1, SEND_TRIES + 1))


def test_the_daemon_uses_the_shared_policy() -> None:
    assert daemon_datagrams.MAX_FRAME == MAX_FRAME
    assert daemon_datagrams.MAX_FRAGMENTED == MAX_FRAGMENTED
    assert daemon_datagrams.datagram_worthy is datagram_worthy
    assert daemon_datagrams.SEND_TRIES == SEND_TRIES


def test_a_lossless_path_delivers_in_one_one_way_and_counts_the_ack() -> None:
    net = _net()
    plan = datagram_plan(net, 0, 1, 300, 1000)
    wire_ms = wire_bytes(300) * 8 / net.bits_per_ms
    assert plan.deliver_at == 1000 + int(ONE_WAY_MS + wire_ms) + 1
    assert plan.fallback_at == NEVER
    assert (plan.sends, plan.acks) == (1, 1)
    # the body arrives at the receiver, its ack back at the sender: both are bytes received
    assert [(node, nbytes) for _, node, nbytes in plan.arrivals] == [(1, wire_bytes(300)), (0, ACK_BYTES)]
    assert ACK_BYTES == wire_bytes(0)  # IPv4 + UDP + seal + the acknowledged id


def test_the_rto_follows_the_daemons_rule() -> None:
    net = _net()
    assert path_rto_ms(net, 0, 1) == pytest.approx(1000 * rto_s(2 * ONE_WAY_MS / 1000))  # 3 x 20 ms
    lan = Network(NetworkCfg(transport="mixed", intra_region_ms=0.05), TcpCfg(), ["lan"], [0, 0], random.Random(1))
    assert path_rto_ms(lan, 0, 1) == pytest.approx(5.0)  # clamped to the 5 ms floor, as on loopback


def test_with_loss_the_delay_is_a_multiple_of_the_rto_not_tcps_200_ms() -> None:
    rto = path_rto_ms(_net(), 0, 1)  # 60 ms
    sends_at = [0.0, retry_after_s(rto, 1), retry_after_s(rto, 1) + retry_after_s(rto, 2)]  # 0, rto, 3 rto
    seen: set[int] = set()
    for seed in range(300):
        plan = datagram_plan(_net(loss=0.4, seed=seed), 0, 1, 200, 0)
        if plan.deliver_at == NEVER:
            assert plan.fallback_at == int(_fallback_ms(rto)) + 1  # never silently lost
            continue
        extra = plan.deliver_at - int(ONE_WAY_MS) - 1
        assert any(abs(extra - s) <= 1 for s in sends_at), extra
        seen.add(round(extra / rto))
    assert seen == {0, 1, 3}  # first try, second, third: each timed from the path's round trip
    assert 3 * rto < 200


def test_a_fragmented_body_arrives_when_every_fragment_has() -> None:
    size = 5000
    count = fragment_count(size)
    assert count == 5 and datagram_worthy(bytes([0x93, 7]) + bytes(size - 2))
    plan = datagram_plan(_net(), 0, 1, size, 0)
    assert (plan.sends, plan.acks, plan.fallback_at) == (count, count, NEVER)
    data = [nbytes for _, node, nbytes in plan.arrivals if node == 1]
    assert len(data) == count and all(n <= MAX_DATAGRAM + UDP_IP_HEADER for n in data)
    assert sum(n for _, node, n in plan.arrivals if node == 0) == count * ACK_BYTES


def test_a_body_that_cannot_get_through_falls_back_to_the_stream() -> None:
    net = _net()
    net.up[1] = False  # every datagram lost: after the last try the whole message goes on the stream
    plan = datagram_plan(net, 0, 1, 5000, 100)
    rto = path_rto_ms(net, 0, 1)
    assert plan.deliver_at == NEVER and plan.arrivals == []
    assert plan.fallback_at == 100 + int(_fallback_ms(rto)) + 1
    assert plan.sends == SEND_TRIES * fragment_count(5000)
    # too big for fragments: not datagram-worthy at all (the stream from the start)
    assert not datagram_worthy(bytes([0x93, 7]) + bytes(MAX_FRAGMENTED))


def test_paths_come_up_after_a_probe_round_trip() -> None:
    up_dialer, up_acceptor = probe_up_at(_net(), 0, 1, 1000)
    assert up_dialer == 1000 + int(2 * ONE_WAY_MS) + 1
    assert up_dialer < up_acceptor < NEVER
    net = _net()
    net.up[1] = False
    assert probe_up_at(net, 0, 1, 1000) == (NEVER, NEVER)  # no answer: the stream only


@settings(max_examples=200, deadline=None)
@given(loss=st.floats(0.0, 0.9), jitter=st.floats(0.0, 1.0), size=st.integers(2, MAX_FRAGMENTED),
       seed=st.integers(0, 2**32 - 1), t=st.integers(0, 10**6))
def test_a_message_is_delivered_or_falls_back_never_silently_lost(loss: float, jitter: float, size: int, seed: int,
                                                                   t: int) -> None:
    net = _net(loss=loss, jitter=jitter, seed=seed)
    plan = datagram_plan(net, 0, 1, size, t)
    rto = path_rto_ms(net, 0, 1)
    count = fragment_count(size)
    assert plan.deliver_at != NEVER or plan.fallback_at != NEVER
    if plan.deliver_at != NEVER:
        assert plan.deliver_at >= t + ONE_WAY_MS
    if plan.fallback_at != NEVER:
        assert plan.fallback_at == t + int(_fallback_ms(rto)) + 1
    assert count <= plan.sends <= SEND_TRIES * count
    assert plan.acks == sum(1 for _, node, _ in plan.arrivals if node == 1)
    assert all(at >= t for at, _, _ in plan.arrivals)


def test_a_lossy_run_with_the_mixed_transport_converges_and_counts_its_datagrams() -> None:
    sc = override(load("loopback-12"), loss=0.1, transport="mixed")
    report, _ = run_scenario(sc)
    assert report["transport"] == "mixed" and report["invariant_violations"] == 0
    assert all(v["converged_fraction"] == 1.0 for v in report["versions"])
    dg = report["datagrams"]
    assert dg["messages"] > 0 and dg["retransmits"] > 0 and dg["acks"] > 0
    assert dg["sent"] - dg["retransmits"] >= dg["messages"]  # fragments add datagrams
    tcp, _ = run_scenario(override(sc, transport="tcp"))
    assert "datagrams" not in tcp  # the default reports stay as they were


# -- one host's shared cores ([nodes] host_cores), as in the netns benchmark -------------------------------
def _handled_at(cores: int, arrivals: list[tuple[int, bytes]]) -> list[int]:
    """Feed messages arriving now at the given nodes through a finished netns-12 run's host model; the
    times the nodes get them."""
    sc = override(load("netns-12"), nodes=4)
    _, sim = run_scenario(sc)
    world, kernel = sim.world, sim.kernel
    world.cores = [0.0] * cores
    world.node_free = {}
    frames = []
    for node, data in arrivals:
        frame = FrameReceived(sim.ids[0], data)
        frames.append(frame)
        world._host_cpu(node, (sim.net.epoch[node], frame, False))
    at = {id(inp): key >> SEQ_BITS for key, (_, _, inp) in kernel.pending.items()}
    return [at[id(f)] - kernel.now for f in frames]


PING = bytes([0x92, 1, 0])
BODY = bytes([0x93, 7, 0])


def test_messages_queue_for_the_hosts_cores_and_each_daemons_event_loop() -> None:
    sc = load("netns-12").nodes
    c, body = sc.process_ms, sc.body_process_ms
    assert sc.host_cores == 2 and body is not None and body > c
    # two cores: two daemons handle a message each at once; a third waits for a core
    assert _handled_at(2, [(1, BODY), (2, BODY), (3, BODY)]) == [math.ceil(body), math.ceil(body), math.ceil(2 * body)]
    # one daemon is one event loop: its second message waits for its first, whatever the cores
    assert _handled_at(2, [(1, PING), (1, PING)]) == [math.ceil(c), math.ceil(2 * c)]
    # one core: everything in order of arrival
    assert _handled_at(1, [(1, PING), (2, BODY)]) == [math.ceil(c), math.ceil(c + body)]


def test_an_apply_takes_the_hosts_cpu_after_the_pushes() -> None:
    """``apply_cpu_ms``: each node's apply of a new version holds a core and its event loop after the
    message that brought the version (its pushes are out first): every node's applied time moves by at
    least the charge, the version's spread through the tree does not wait for the applies, and the
    host's 2 cores queue the applies of a burst."""
    base = override(load("netns-12"), nodes=6)
    base = msgspec.structs.replace(base, nodes=msgspec.structs.replace(base.nodes, apply_cpu_ms=0.0))
    slow = msgspec.structs.replace(base, nodes=msgspec.structs.replace(base.nodes, apply_cpu_ms=100.0))
    (fast_report, fast), (slow_report, slow_sim) = run_scenario(base, progress=False), run_scenario(slow, progress=False)
    for v0, v1 in zip(fast.versions, slow_sim.versions, strict=True):
        assert v0.published_at is not None and v1.published_at is not None
        d0 = sorted(at - v0.published_at for at in v0.applied.values())
        d1 = sorted(at - v1.published_at for at in v1.applied.values())
        assert len(d0) == len(d1) == 6
        assert all(b >= a + 100 for a, b in zip(d0, d1, strict=True))
        # six applies of 100 ms on 2 cores: the last is done at least 300 ms after the first node got it
        assert d1[-1] - d0[0] >= 300
    assert fast_report["versions"][0]["t100_ms"] < slow_report["versions"][0]["t100_ms"]


def test_host_cores_must_not_be_negative() -> None:
    with pytest.raises(ScenarioError, match="host_cores"):
        from_dict({"name": "x", "nodes": {"count": 3, "host_cores": -1}})
    with pytest.raises(ScenarioError, match="apply_cpu_ms"):
        from_dict({"name": "x", "nodes": {"count": 3, "host_cores": 2, "apply_cpu_ms": -1}})
