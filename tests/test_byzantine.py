"""Byzantine enrolled peers (issue 10): lies about versions, equivocation, lying status, amplification.

Each test drives real nodes over the fake link (or the simulator) with frames a rogue *enrolled*
peer could send, and asserts that honest dissemination, convergence and status are unaffected.
"""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from meshnode.status_view import format_status
from protocol.gossip import (
    Alert,
    Disconnect,
    FrameReceived,
    PersistPolicy,
    PolicySubmitted,
    RulesetApplied,
    Send,
)
from protocol.gossip.claim_book import CLAIM_TTL_MS, MAX_CLAIMS
from protocol.gossip.conduct import EPISODE_QUIET_MS, PeerConduct
from protocol.gossip.wire import (
    Ack,
    Announce,
    Digest,
    Ping,
    PolicyPull,
    PolicyPush,
    RootPull,
    Status,
    StatusBody,
    decode,
    encode,
)
from protocol.trust import decode_envelope, payload_hash, sign
from simulations.engine import replay_hint, run_scenario
from simulations.fakelink import FakeLink, applied_policies
from simulations.identities import T0, derive_seed
from simulations.scenario import load, override
from tests.fixtures import sign_sample

LIE = 1 << 62


def joined(n: int = 3, **kw) -> FakeLink:
    link = FakeLink(n=n, **kw)
    link.start()
    link.run_for(8000)
    return link


def h_of(env: bytes) -> str:
    return payload_hash(decode_envelope(env, "policy").payload)


def digest_of(env: bytes, serial: int) -> Digest:
    return Digest(serial, bytes.fromhex(h_of(env)), 1)


def alerts(effects, event: str) -> list[Alert]:
    return [e for e in effects if isinstance(e, Alert) and e.event == event]


def sends(effects, kind: type) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and isinstance(decode(e.data), kind)]


# -- 1. no single peer can stall dissemination ------------------------------------------------------
def test_an_unserved_absurd_claim_does_not_stall_the_next_version():
    link = joined(3)
    n0 = link.hosts["n0"].node
    # n1 "claims" serial 2^62 (and an inflated root version) on every probe; nobody serves it
    for _ in range(3):
        link.feed("n0", FrameReceived("n1", encode(Ping(1, "n0", serial=LIE, root_version=1))))
        link.feed("n0", FrameReceived("n1", encode(Ack(1, serial=LIE, root_version=999))))
    env = sign_sample(link.auth, 2)
    link.feed("n2", PolicySubmitted(env, "op"))
    link.run_for(3000)
    assert n0.trust.serial == 2, "an unserved claim shadowed the version n2 serves"
    # the claim went unserved: counted, and alerted once for the episode
    link.run_for(5000)
    assert n0.dissemination.counters["unserved_claims"] >= 1
    assert n0.dissemination.unserved.get("n1", 0) >= 1
    every = [e for e in link.hosts["n0"].effects if isinstance(e, Alert) and e.event == "gossip.unserved_claim"]
    assert len(every) == 1 and every[0].fields["peer"] == "n1"
    # and it is forgotten: no claim outlives its lifetime
    link.run_for(CLAIM_TTL_MS + 6000)
    assert all(d.serial < LIE for d in n0.dissemination.wanted)


def test_a_lower_version_pushed_while_a_higher_claim_is_wanted_is_accepted():
    link = joined(3)
    link.feed("n0", FrameReceived("n1", encode(Announce(Digest(LIE, b"\x01" * 32, 1)))))
    env = sign_sample(link.auth, 2)
    out = link.feed("n0", FrameReceived("n2", encode(PolicyPush(env))))
    assert [a.policy.serial for a in applied_policies(out)] == [2]
    assert not alerts(out, "policy.stale_offer")


def test_a_fake_hash_at_the_next_serial_does_not_shadow_the_real_one():
    link = joined(3)
    n0 = link.hosts["n0"].node
    # the liar claims serial 2 with a made-up hash before the real serial 2 exists
    link.feed("n0", FrameReceived("n1", encode(Announce(Digest(2, hashlib.sha256(b"x").digest(), 1)))))
    env = sign_sample(link.auth, 2)
    link.feed("n2", PolicySubmitted(env, "op"))
    link.run_for(3000)
    assert n0.trust.serial == 2 and n0.trust.policy_hash == h_of(env)
    assert n0.trust.equivocation is None  # a claim alone is never an equivocation
    assert not any(isinstance(e, Alert) and e.event == "policy.equivocation" for e in link.hosts["n0"].effects)


def test_claims_are_bounded_per_peer_and_in_total():
    link = joined(2)
    n0 = link.hosts["n0"].node
    for i in range(500):  # one peer, many claims: only its latest is live
        link.feed("n0", FrameReceived("n1", encode(Announce(Digest(LIE + i, b"\x02" * 32, 1)))))
    assert sum(1 for c in n0.dissemination.claims.values() if "n1" in c.sources) == 1
    for i in range(3 * MAX_CLAIMS):  # many peers (as if enrolled), one claim each
        link.feed("n0", FrameReceived(f"rogue{i}", encode(Announce(Digest(LIE - i, b"\x03" * 32, 1)))))
    assert len(n0.dissemination.claims) <= MAX_CLAIMS
    assert len(n0.dissemination.claim_of) <= MAX_CLAIMS + 1
    # an honest announce still gets in, and is pulled
    env = sign_sample(link.auth, 2)
    link.hosts["n1"].node.trust.accept_policy(env, T0)
    out = link.feed("n0", FrameReceived("n1", encode(Announce(digest_of(env, 2)))))
    assert any(decode(s.data).serial == 2 for s in sends(out, PolicyPull))
    link.run_for(2000)
    assert n0.trust.serial == 2


def test_an_inflated_root_version_does_not_use_up_root_fetches_from_others():
    link = joined(3)
    n0 = link.hosts["n0"].node
    link.feed("n0", FrameReceived("n1", encode(Ping(1, "n0", serial=LIE, root_version=999))))
    out = link.feed("n0", FrameReceived("n2", encode(Announce(Digest(5, b"\x04" * 32, 2)))))
    assert [s.peer for s in sends(out, RootPull)] == ["n2"], "the liar's root claim blocked the honest one"
    assert n0.trust.root_version == 1


# -- 2. equivocation --------------------------------------------------------------------------------
def two_policies(auth, serial: int) -> tuple[bytes, bytes]:
    a = sign_sample(auth, serial)
    b = sign_sample(auth, serial, now=T0 + 1)
    return (a, b) if h_of(a) < h_of(b) else (b, a)


def test_equivocation_converges_every_node_on_the_lower_hash_and_shows_in_status():
    link = joined(5, regions=["a", "b"])
    low, high = two_policies(link.auth, 2)
    link.feed("n0", PolicySubmitted(high, "op"))
    link.feed("n3", PolicySubmitted(low, "op"))
    link.run_for(60_000)  # statuses reconcile by anti-entropy
    for nid, h in link.hosts.items():
        assert h.node.trust.policy_hash == h_of(low), nid
        applied = [(a.policy.serial, a.policy_hash) for a in h.applied]
        # at most one change, and only downwards: never a flip-flop
        assert applied in ([(2, h_of(low))], [(2, h_of(high)), (2, h_of(low))]), (nid, applied)
        view = h.node.status(link.now())
        conv = view["convergence"]
        assert conv["state"] == "equivocation", (nid, conv)
        assert conv["equivocation"]["hashes"] == sorted([h_of(low)[:16], h_of(high)[:16]])
        assert conv["equivocation"]["kept"] == h_of(low)[:16]
        text = format_status({"node": nid, "policy": view["policy"], "enforcement": {}, "cluster_view": view})
        assert "EQUIVOCATION at serial 2" in text and h_of(high)[:16] in text, text
    # the nodes that verified both bodies alerted, once each
    alerted = {nid for nid, h in link.hosts.items() if alerts(h.effects, "policy.equivocation")}
    assert alerted and all(len(alerts(link.hosts[n].effects, "policy.equivocation")) == 1 for n in alerted)
    # a higher serial supersedes it
    link.feed("n1", PolicySubmitted(sign_sample(link.auth, 3), "op"))
    link.run_for(60_000)
    for h in link.hosts.values():
        assert h.node.trust.serial == 3 and h.node.trust.equivocation is None
        assert h.node.status(link.now())["convergence"]["state"] == "converged"


def test_a_node_holding_the_higher_hash_switches_once_and_refuses_it_afterwards():
    link = joined(2)
    n0 = link.hosts["n0"].node
    low, high = two_policies(link.auth, 2)
    link.feed("n0", PolicySubmitted(high, "op"))
    out = link.feed("n0", FrameReceived("n1", encode(PolicyPush(low))))
    assert [(a.policy.serial, a.policy_hash) for a in applied_policies(out)] == [(2, h_of(low))]
    assert any(isinstance(e, PersistPolicy) and e.envelope == low for e in out)
    assert len(alerts(out, "policy.equivocation")) == 1
    out = link.feed("n0", FrameReceived("n1", encode(PolicyPush(high))))
    assert not applied_policies(out) and not alerts(out, "policy.equivocation")
    assert n0.trust.policy_hash == h_of(low)
    eq = n0.trust.equivocation
    assert eq is not None and eq.hashes == (h_of(low), h_of(high))


# -- 3. truthful status -----------------------------------------------------------------------------
def test_trusted_but_not_enforced_is_its_own_state_with_an_alert_and_never_converged():
    link = joined(3)
    link.hosts["n2"].enforces = False  # its enforcer never confirms (e.g. the persist failed)
    env = sign_sample(link.auth, 2)
    link.feed("n0", PolicySubmitted(env, "op"))
    link.run_for(50_000)
    n2 = link.hosts["n2"]
    assert n2.node.trust.serial == 2  # trusted ...
    lag = alerts(n2.effects, "policy.not_enforced")
    assert len(lag) == 1 and lag[0].fields["trusted_serial"] == 2 and lag[0].fields["enforced_serial"] == 1 - 1
    me = n2.node.status(link.now())
    assert me["policy"]["enforced"]["state"] == "not_enforced"
    view = link.hosts["n0"].node.status(link.now())
    by_id = {m["node_id"]: m for m in view["members"]}
    assert by_id["n2"]["converged"] is False and by_id["n2"]["trusted_serial"] == 2
    assert by_id["n2"]["state"] == "not_enforced"
    assert view["convergence"]["converged"] == 2 and view["convergence"]["state"] == "converging"
    # the enforcer catches up: resolved, and converged everywhere
    link.feed("n2", RulesetApplied(2, "ab" * 16, h_of(env)))
    assert alerts(n2.effects, "policy.not_enforced.resolved")
    link.run_for(50_000)
    assert link.hosts["n0"].node.status(link.now())["convergence"]["converged"] == 3


def test_a_lying_status_is_never_counted_as_converged_nor_moves_the_target():
    link = joined(3)
    env = sign_sample(link.auth, 2)
    link.feed("n0", PolicySubmitted(env, "op"))
    link.run_for(5000)
    n0 = link.hosts["n0"].node
    n1 = link.hosts["n1"].node
    # n1 signs (with its real identity key) a status claiming serial 2^62 enforced
    body = StatusBody("n1", n1.membership.own.status_seq + 10, LIE, b"\x05" * 8, b"\x06" * 8, "fresh", LIE, b"\x05" * 8)
    payload = encode(body)
    sig = sign("member", payload, [derive_seed("node", "test", "n1", "identity")]).signatures[0].sig
    n0.membership.records.learn_status(Status(payload, sig))
    conv = n0.status(link.now())["convergence"]
    assert conv["target_serial"] == 2 and conv["claims_ahead"] == 1
    members = {m["node_id"]: m for m in n0.status(link.now())["members"]}
    assert members["n1"]["converged"] is False and members["n0"]["converged"] is True


# -- 4. amplification and replay --------------------------------------------------------------------
def test_many_pulls_of_the_current_policy_return_one_body():
    link = joined(2)
    link.feed("n0", PolicySubmitted(sign_sample(link.auth, 2), "op"))
    link.run_for(2000)
    n0 = link.hosts["n0"]
    before = len(sends(n0.effects, PolicyPush))
    flood = encode(PolicyPull(2, b""))
    out = []
    for _ in range(2000):
        out += n0.node.handle(link.now(), FrameReceived("n1", flood))
    bodies = sends(out, PolicyPush)
    assert len(bodies) + before <= 1 + before and len(bodies) <= 1, len(bodies)
    assert len(alerts(out, "gossip.pull_flood")) == 1
    assert any(isinstance(e, Disconnect) and e.peer == "n1" for e in out)


def test_replayed_old_policies_alert_once_per_episode_and_cost_the_channel():
    link = joined(2)
    old = sign_sample(link.auth, 2)
    link.feed("n0", PolicySubmitted(old, "op"))
    link.feed("n0", PolicySubmitted(sign_sample(link.auth, 3), "op"))
    n0 = link.hosts["n0"].node
    out = []
    for _ in range(2000):
        out += n0.handle(link.now(), FrameReceived("n1", encode(PolicyPush(old))))
    assert len(alerts(out, "policy.stale_offer")) == 1
    assert any(isinstance(e, Disconnect) and e.peer == "n1" and e.reason == "stale_offer" for e in out)
    assert n0.counters["stale_offers"] == 2000 and n0.trust.serial == 3


def test_conduct_episodes_end_after_quiet_and_memory_is_fixed():
    c = PeerConduct()
    assert c.note("p", "stale_offer", 0).alert
    assert not c.note("p", "stale_offer", 10).alert
    assert c.note("p", "stale_offer", 10 + EPISODE_QUIET_MS).alert  # a new episode
    for i in range(10_000):
        c.note(f"p{i}", "unserved_claim", i)
    assert len(c) <= 4096


# -- 5. the Byzantine guarantee in the simulator ----------------------------------------------------
ALL = ["replay", "withhold", "lure", "lie", "flood"]


def hostile(nodes: int, seed: int, behaviours: list[str] | None, equivocate: bool = False, bound: int = 0):
    sc = override(load("hostile"), nodes=nodes, seed=seed)
    hc = sc.hostile
    hc = msgspec.structs.replace(hc, fraction=0.0, count=0) if behaviours is None else \
        msgspec.structs.replace(hc, behaviours=behaviours)
    return msgspec.structs.replace(sc, hostile=hc,
                                   policy=msgspec.structs.replace(sc.policy, equivocate=equivocate),
                                   checks=msgspec.structs.replace(sc.checks, convergence_bound_ms=bound))


@pytest.mark.simulation
def test_sim_liars_flooders_and_replayers_cannot_delay_honest_convergence():
    calm, _ = run_scenario(hostile(40, 1, None))
    normal = max(v["t100_ms"] for v in calm["versions"])
    bound = 3 * normal  # the normal bound, with margin for the sources hostile nodes do not provide
    r, sim = run_scenario(hostile(40, 1, ALL, bound=bound))
    hint = replay_hint(r)
    assert r["hostile_nodes"] == 4 and r["convergence_bound_ms"] == bound
    assert r["invariant_violations"] == 0, f"{hint}: {r['violations']}"
    for v in r["versions"]:
        assert v["t100_ms"] is not None and v["t100_ms"] <= bound, (hint, v["serial"], v["t100_ms"], normal)
    assert r["alerts"].get("gossip.unserved_claim", 0) > 0 and r["alerts"].get("gossip.pull_flood", 0) > 0
    # at most one alert per (observer, rogue peer, kind) episode
    honest = sum(1 for h in sim.hosts[: sim.n] if not h.hostile)
    assert r["alerts"]["gossip.pull_flood"] <= sim.n * r["hostile_nodes"]  # observers x rogues
    # flooding pulls get at most one body per (peer, version), not one per pull
    versions = 1 + len(r["versions"])
    assert r["bodies_to_hostile"] <= honest * r["hostile_nodes"] * versions


@pytest.mark.simulation
def test_sim_equivocation_through_two_nodes_converges_on_the_lower_hash_with_hostile_peers():
    r, sim = run_scenario(hostile(40, 2, ["lie", "flood"], equivocate=True, bound=6000))
    hint = replay_hint(r)
    assert r["invariant_violations"] == 0, f"{hint}: {r['violations']}"
    eq = r["equivocation"]
    assert eq is not None and eq["on_kept"] == r["live_nodes"], hint
    assert eq["status_shows_equivocation"] == r["live_nodes"], hint
    assert eq["alerts"] > 0
    v = sim.versions[-1]
    assert eq["kept"] == min(v.hash, v.twin_hash)
