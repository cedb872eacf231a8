"""Engine internals that keep big runs small and fast, with behaviour unchanged."""

from __future__ import annotations

import random

from protocol.gossip import PolicySubmitted
from protocol.trust import TrustedState
from simulations.baselines import FloodNode
from simulations.engine import Simulation
from simulations.fakelink import FakeLink
from simulations.invariants import Invariants
from simulations.network import Network
from simulations.scenario import load, override
from tests.fixtures import sign_sample


def test_persisted_member_files_are_kept_only_for_hosts_that_restart() -> None:
    sim = Simulation(override(load("churn"), nodes=60, duration_ms=75_000))
    report = sim.run()
    assert report["invariant_violations"] == 0, report["violations"]
    assert sim.restartable  # wave 1 restarts within the run; wave 2 (until 90 s) does not
    for h in sim.hosts[: sim.n]:
        if h.idx in sim.restartable:
            assert h.disk.members is not None
        else:
            assert h.disk.members is None
        assert h.disk.members_persisted > 0
    assert sim.persisted_member_entries >= sum(h.disk.members_persisted for h in sim.hosts[: sim.n])


def test_directory_check_reads_only_and_lists_drops_in_order() -> None:
    inv = Invariants(b"anchor", revoked_nodes={"r"})
    before = {"a": b"1", "b": b"2", "r": b"3", "c": b"4"}
    after = {"a": b"1"}
    frozen = dict(after)
    inv.check_directory(1, 5, "n0", before, after)
    assert after == frozen
    assert inv.count == 2
    assert "dropped b " in inv.listed[0] and "dropped c " in inv.listed[1]
    inv.check_directory(1, 6, "n0", after, after)
    inv.check_directory(1, 6, "n0", None, after)
    inv.check_directory(1, 6, "n0", {"a": b"1", "x": b"9"}, {"a": b"1"}, expired={"x"})
    assert inv.count == 2


def test_flood_node_on_a_shared_peer_list_sends_what_a_private_copy_would() -> None:
    peers = [(f"n{i}", f"10.0.0.{i}:1") for i in range(40)]
    for me in (0, 17, 39):
        a = FloodNode(None, f"n{me}", peers, 3, 1, 100, random.Random(7))  # type: ignore[arg-type]
        b = FloodNode(None, f"n{me}", peers, 3, 1, 100, random.Random(7), self_index=me)  # type: ignore[arg-type]
        for _ in range(50):
            ka = a.rng.sample(a.peers, 3)
            kb = [b.peers[k if k < b.skip else k + 1] for k in b.rng.sample(range(b.npeers), 3)]
            assert ka == kb
            assert peers[me] not in kb


def test_drop_node_returns_peers_in_connection_order() -> None:
    sc = load("lan")
    net = Network(sc.network, sc.tcp, ["dc1"], [0] * 8, random.Random(1))
    net.up = [True] * 8
    net.host_up = [True] * 8
    net.epoch = [0] * 8
    for a, b in [(3, 1), (5, 3), (2, 4), (3, 7), (6, 3)]:
        net.transmit(a, b, 100, 0, lambda *_: None, lambda *_: None)
    net.close(3, 7)
    assert net.drop_node(3) == [1, 5, 6]
    assert all(3 not in (k // net.stride, k % net.stride) for k in net.conns)
    assert net.adj[1] == {} and net.adj[2] == {4: None}


def test_fake_link_executes_every_effect_onto_the_host_like_the_engine() -> None:
    link = FakeLink(3)
    link.start()
    link.run_for(5000)
    envelope = sign_sample(link.auth, 2)
    link.feed("n1", PolicySubmitted(envelope, "op"))
    link.run_for(link.cfg.peers_persist_interval_ms + 5000)
    for h in link.hosts.values():
        assert h.node.trust.serial == 2
        assert h.disk.policy is not None and TrustedState(link.auth.root_bytes).accept_policy(
            h.disk.policy, link.now().wall).policy.serial == 2
        assert h.disk.directory is not None and set(h.disk.directory) == set(link.hosts)
        assert h.disk.members is not None and h.disk.members_persisted == len(h.disk.members)
        assert {m.node_id for m in h.disk.members} == set(link.hosts) - {h.node_id}
