"""External validation without root: target and port selection from the signed policy (seeded), the judging
of each outcome, the finding lifecycle of holes and blocked ports, unreachable members and regions on a
virtual clock, and the prober against real sockets on loopback."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from meshnode.checks.findings import FindingChanges
from meshnode.checks.peer_probe import PortResult, ProbeResult, probe_port, probe_target
from meshnode.checks.peer_validation import BLOCKED_CHECK, HOLE_CHECK, PeerValidation
from meshnode.checks.probe_plan import (
    BLOCKED,
    CLOSED,
    ERROR,
    FILTERED,
    HOLE,
    MESH,
    NO_LISTENER,
    OK,
    OPEN,
    REACHABLE,
    REFUSED,
    UNKNOWN,
    Expectation,
    ProbeBudget,
    ProbeTarget,
    address_pair,
    candidate_ports,
    expectations,
    judge,
    plan_round,
)
from meshnode.checks.reachability import PEER_CHECK, REGION_CHECK, Reachability
from meshnode.enforce.model import Packet, RenderOptions
from meshnode.enforce.render import render
from protocol.gossip.wire import MAX_VALIDATIONS
from protocol.trust import TrustedState
from protocol.trust.policy import parse_policy_toml
from simulations.identities import T0, make_authority, make_node

POLICY = """
[[allow]]
name = "web-to-app"
from = ["role:web"]
to = ["role:app"]
ports = ["tcp/8080"]

[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432", "tcp/6000-6001", "udp/53"]

[[allow]]
name = "ops-ssh"
from = ["node:web1"]
to = ["role:*"]
ports = ["tcp/22"]
"""
MESH_PORT = 7946


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    auth = make_authority()
    spec = {"web1": ("web", "10.0.0.1"), "web2": ("web", "10.0.0.2"), "app1": ("app", "10.0.0.3"),
            "db1": ("db", "10.0.0.4"), "db2": ("db", "10.0.0.5")}
    nodes = {n: make_node(auth, n, roles=(role,), addresses=(addr, f"fd00::{addr.rsplit('.', 1)[1]}"))
             for n, (role, addr) in spec.items()}
    doc, rev = parse_policy_toml(POLICY)
    policy = TrustedState(auth.root_bytes).accept_policy(auth.sign_policy(doc, 1, T0, T0 + 86400, rev), T0).policy
    certs = {n: x.cert for n, x in nodes.items()}
    advertised = {n: f"{addr}:{MESH_PORT}" for n, (_r, addr) in spec.items()}
    return policy, certs, advertised


def test_candidates_are_the_policy_tcp_ports_and_the_extra_ones(mesh) -> None:  # type: ignore[no-untyped-def]
    policy, _certs, _adv = mesh
    assert candidate_ports(policy, [9999, 22]) == [22, 5432, 6000, 6001, 8080, 9999]
    assert candidate_ports(None, [80]) == [80]


def test_expectations_follow_the_targets_rendered_ruleset(mesh) -> None:  # type: ignore[no-untyped-def]
    policy, certs, _adv = mesh
    members = list(certs.values())
    cands = candidate_ports(policy, [9999])
    # web2 (role web, not web1) probing db1: nothing is open to it but the mesh port.
    refused, reachable = expectations(policy, certs["db1"], members, MESH_PORT, "10.0.0.2", cands, now=T0)
    assert (refused, reachable) == ([22, 5432, 6000, 6001, 8080, 9999], [])
    # app1 probing db1: the db ports; web1 probing db1: ssh.
    assert expectations(policy, certs["db1"], members, MESH_PORT, "10.0.0.3", cands, now=T0)[1] == [5432, 6000, 6001]
    assert expectations(policy, certs["db1"], members, MESH_PORT, "10.0.0.1", cands, now=T0)[1] == [22]
    # IPv6 sources are judged by the IPv6 sets.
    assert expectations(policy, certs["db1"], members, MESH_PORT, "fd00::3", cands, now=T0)[1] == [5432, 6000, 6001]
    # A source that is no member's address is refused everything.
    assert expectations(policy, certs["db1"], members, MESH_PORT, "10.9.9.9", cands, now=T0)[1] == []


@pytest.mark.parametrize("extra", ["", '\n[defaults]\ninbound = "reject"\n', '\n[defaults]\nmode = "log"\n',
                                   '\n[[allow]]\nname = "trial"\nfrom = ["role:web"]\nto = ["role:db"]\n'
                                   'ports = ["tcp/7000-7010"]\nmode = "log"\n'])
def test_verdicts_agree_with_evaluate(mesh, extra: str) -> None:  # type: ignore[no-untyped-def]
    _policy, certs, _adv = mesh
    auth = make_authority()
    doc, rev = parse_policy_toml(extra + POLICY if extra.startswith("\n[defaults]") else POLICY + extra)
    policy = TrustedState(auth.root_bytes).accept_policy(auth.sign_policy(doc, 1, T0, T0 + 86400, rev), T0).policy
    rs = render(policy, certs["db1"], list(certs.values()), RenderOptions(mesh_port=MESH_PORT), now=T0)
    ports = [1, 22, 53, 5432, 6000, 6001, 6002, 7000, 7005, 7946, 8080, 9999, 65535]
    for src in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::3", "10.9.9.9"):
        assert rs.verdicts(src, "tcp", ports) == {p: rs.evaluate(Packet(src=src, proto="tcp", dport=p)) for p in ports}


def test_only_certificate_addresses_are_probed(mesh) -> None:  # type: ignore[no-untyped-def]
    _policy, certs, _adv = mesh
    assert address_pair(certs["db1"], certs["web1"], "10.0.0.4") == ("10.0.0.4", "10.0.0.1")
    assert address_pair(certs["db1"], certs["web1"], "fd00::4") == ("fd00::4", "fd00::1")
    # An advertised host outside the certificate is never a target: the certificate's first address is.
    assert address_pair(certs["db1"], certs["web1"], "192.0.2.66") == ("10.0.0.4", "10.0.0.1")
    assert address_pair(certs["db1"], certs["web1"], "10.0.0.4", source_address="fd00::1") == ("fd00::4", "fd00::1")


def test_a_round_is_seeded_budgeted_and_never_targets_non_members_or_itself(mesh) -> None:  # type: ignore[no-untyped-def]
    policy, certs, adv = mesh
    members = [c for n, c in certs.items() if n != "db2"]  # db2: not a valid member (revoked, expired)
    budget = ProbeBudget(targets=2, refused=2, reachable=1, extra_ports=(9999,))
    adv = {**adv, "stranger": "10.0.0.66:7946"}
    plans = [plan_round(policy, certs["app1"], members, adv, random.Random(seed), budget, now=T0)
             for seed in range(40)]
    assert plan_round(policy, certs["app1"], members, adv, random.Random(3), budget, now=T0) == plans[3]
    seen = set()
    for plan in plans:
        assert len(plan) == 2
        for t in plan:
            seen.add(t.node_id)
            assert t.node_id in {"web1", "web2", "db1"} and t.source == "10.0.0.3"
            kinds = [e.expect for e in t.ports]
            assert kinds.count(REFUSED) <= 2 and kinds.count(REACHABLE) <= 1 and kinds[-1] == MESH
            assert t.ports[-1].port == MESH_PORT
            if t.node_id == "db1":
                assert {e.port for e in t.ports if e.expect == REACHABLE} <= {5432, 6000, 6001}
                assert {e.port for e in t.ports if e.expect == REFUSED} <= {22, 8080, 9999}
    assert seen == {"web1", "web2", "db1"}
    assert plan_round(None, certs["app1"], members, adv, random.Random(1), budget) == []


def test_ports_with_open_findings_are_probed_again(mesh) -> None:  # type: ignore[no-untyped-def]
    policy, certs, adv = mesh
    budget = ProbeBudget(targets=1, refused=0, reachable=0)
    picks = [plan_round(policy, certs["web2"], list(certs.values()), adv, random.Random(s), budget,
                        held={"db1": {9999, 5432}}, now=T0) for s in range(20)]
    held_rounds = [p[0] for p in picks if p[0].node_id == "db1"]
    assert len(held_rounds) >= 5  # the held target gets every other round or so, not just 1 in 4
    assert held_rounds[0].ports == (Expectation(5432, REFUSED), Expectation(9999, REFUSED),
                                    Expectation(MESH_PORT, MESH))


@pytest.mark.parametrize(("expect", "outcome", "mesh_open", "verdict"), [
    (REFUSED, OPEN, True, HOLE), (REFUSED, OPEN, False, HOLE), (REFUSED, CLOSED, True, OK),
    (REFUSED, FILTERED, True, OK), (REFUSED, ERROR, True, UNKNOWN),
    (REACHABLE, OPEN, True, OK), (REACHABLE, CLOSED, True, NO_LISTENER), (REACHABLE, FILTERED, True, BLOCKED),
    (REACHABLE, FILTERED, False, UNKNOWN), (MESH, OPEN, True, OK), (MESH, FILTERED, False, UNKNOWN),
    (MESH, CLOSED, False, NO_LISTENER),
])
def test_judge(expect: str, outcome: str, mesh_open: bool, verdict: str) -> None:
    assert judge(expect, outcome, mesh_open) == verdict


def _result(target: str, at: float, *ports: tuple[int, str, str]) -> ProbeResult:
    return ProbeResult(target, "10.0.0.4", "10.0.0.2", at,
                       tuple(PortResult(p, e, o) for p, e, o in ports) + (PortResult(MESH_PORT, MESH, OPEN),))


def _raised(changes: FindingChanges) -> list[str]:
    return [f.subject for f in changes.raised]


def test_a_hole_is_one_alert_per_episode_and_resolves_when_refused_again() -> None:
    pv = PeerValidation()
    ch = pv.record(_result("db1", T0, (9999, REFUSED, OPEN), (22, REFUSED, CLOSED)))
    assert _raised(ch[HOLE_CHECK]) == ["db1/tcp/9999"] and not ch[HOLE_CHECK].resolved
    finding = ch[HOLE_CHECK].raised[0]
    assert finding.severity == "critical" and "db1" in finding.summary and finding.details["port"] == 9999
    assert pv.held() == {"db1": {9999}}
    assert pv.reports()[0].holes == (9999,) and pv.reports()[0].checked == 2  # 22 and the mesh port
    for k in range(1, 5):  # the hole holds: nothing new
        ch = pv.record(_result("db1", T0 + 30 * k, (9999, REFUSED, OPEN)))
        assert not ch[HOLE_CHECK].raised and not ch[HOLE_CHECK].resolved
    ch = pv.record(_result("db1", T0 + 200, (9999, REFUSED, ERROR)))  # says nothing: kept
    assert not ch[HOLE_CHECK].resolved and pv.held() == {"db1": {9999}}
    ch = pv.record(_result("db1", T0 + 230, (9999, REFUSED, FILTERED)))
    assert ch[HOLE_CHECK].resolved == ("db1/tcp/9999",) and pv.held() == {}
    assert pv.reports()[0].holes == () and pv.reports()[0].at == T0 + 230
    ch = pv.record(_result("db1", T0 + 260, (9999, REFUSED, OPEN)))  # a new episode
    assert _raised(ch[HOLE_CHECK]) == ["db1/tcp/9999"]


def test_a_hole_the_policy_now_allows_resolves() -> None:
    pv = PeerValidation()
    pv.record(_result("db1", T0, (9999, REFUSED, OPEN)))
    ch = pv.record(_result("db1", T0 + 30, (9999, REACHABLE, OPEN)))
    assert ch[HOLE_CHECK].resolved == ("db1/tcp/9999",)


def test_blocked_needs_the_mesh_port_to_answer() -> None:
    pv = PeerValidation()
    down = ProbeResult("db1", "h", "s", T0, (PortResult(5432, REACHABLE, FILTERED), PortResult(MESH_PORT, MESH, FILTERED)))
    ch = pv.record(down)
    assert not ch[BLOCKED_CHECK].raised and pv.reports()[0].checked == 0
    ch = pv.record(_result("db1", T0 + 30, (5432, REACHABLE, FILTERED)))
    assert _raised(ch[BLOCKED_CHECK]) == ["db1/tcp/5432"] and ch[BLOCKED_CHECK].raised[0].severity == "warning"
    assert pv.reports()[0].blocked == (5432,)
    ch = pv.record(_result("db1", T0 + 60, (5432, REACHABLE, CLOSED)))  # a RST got through: not dropped
    assert ch[BLOCKED_CHECK].resolved == ("db1/tcp/5432",)


def test_findings_of_a_member_that_left_the_directory_resolve_and_reports_are_bounded() -> None:
    pv = PeerValidation()
    pv.record(_result("db1", T0, (9999, REFUSED, OPEN)))
    for i in range(MAX_VALIDATIONS + 3):
        pv.record(_result(f"n{i}", T0 + i, (22, REFUSED, CLOSED)))
    reports = pv.reports()
    assert len(reports) == MAX_VALIDATIONS and reports[0].target == f"n{MAX_VALIDATIONS + 2}"
    assert "db1" not in {r.target for r in reports} and pv.held() == {"db1": {9999}}  # still held
    ch = pv.forget([f"n{i}" for i in range(5)])
    assert ch[HOLE_CHECK].resolved == ("db1/tcp/9999",)
    assert {r.target for r in pv.reports()} == {f"n{i}" for i in range(3, 5)}


def test_a_restored_hole_is_re_probed_and_resolved() -> None:
    pv = PeerValidation()
    pv.restore(HOLE_CHECK, "db1/tcp/9999", "enforcement hole on db1 ...")
    pv.restore(HOLE_CHECK, "garbage", "ignored")
    assert pv.held() == {"db1": {9999}}
    ch = pv.record(_result("db1", T0, (9999, REFUSED, CLOSED)))
    assert ch[HOLE_CHECK].resolved == ("db1/tcp/9999",) and not ch[HOLE_CHECK].raised


def test_unreachable_member_then_region_on_a_virtual_clock() -> None:
    reach = Reachability(after_s=60)
    view = {"me": ("eu", "alive"), "a": ("eu", "alive"), "b": ("us", "alive"), "c": ("us", "alive"),
            "d": ("ap", "alive")}

    def run(t: float) -> dict[str, FindingChanges]:
        return reach.round([(n, r, lv) for n, (r, lv) in view.items()], me="me", now=t)

    assert not any(c.raised for c in run(0).values())
    view["b"] = ("us", "suspect")
    assert not run(10)[PEER_CHECK].raised
    assert not run(69)[PEER_CHECK].raised  # 59 s: not yet
    ch = run(70)
    assert _raised(ch[PEER_CHECK]) == ["b"] and ch[PEER_CHECK].raised[0].details["region"] == "us"
    view["b"] = ("us", "dead")
    assert not run(100)[PEER_CHECK].raised  # suspect -> dead is the same episode
    view["c"] = ("us", "suspect")
    assert not any(c.raised or c.resolved for c in run(120).values())
    ch = run(180)  # all of us, long enough: one region alert replaces the member alerts
    assert _raised(ch[REGION_CHECK]) == ["us"] and ch[PEER_CHECK].resolved == ("b",)
    assert ch[REGION_CHECK].raised[0].details["members"] == ["b", "c"]
    assert not any(c.raised or c.resolved for c in run(500).values())
    view["c"] = ("us", "alive")
    ch = run(510)
    assert ch[REGION_CHECK].resolved == ("us",) and _raised(ch[PEER_CHECK]) == ["b"]
    view["b"] = ("us", "left")  # a goodbye is not unreachable
    assert run(520)[PEER_CHECK].resolved == ("b",)
    view["a"] = ("eu", "dead")  # our own region is never "unreachable" as a whole
    view["d"] = ("ap", "dead")  # a region of one member: a member alert
    ch = run(600)
    ch = run(700)
    assert sorted(_raised(ch[PEER_CHECK])) == ["a", "d"] and not ch[REGION_CHECK].raised
    del view["d"]  # no longer a member: resolved
    assert run(710)[PEER_CHECK].resolved == ("d",)


def test_a_restored_unreachable_alert_resolves_when_the_member_answers() -> None:
    reach = Reachability(after_s=60)
    reach.restore(PEER_CHECK, "b", "member b unreachable")
    ch = reach.round([("me", "eu", "alive"), ("b", "us", "alive")], me="me", now=0)
    assert ch[PEER_CHECK].resolved == ("b",)


# -- the prober against real sockets on loopback ---------------------------------------------------------------
def test_probe_outcomes_on_loopback() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        open_port = server.sockets[0].getsockname()[1]
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, not listening: the kernel answers RST
        try:
            assert (await probe_port("127.0.0.1", open_port, "127.0.0.1", 2.0))[0] == OPEN
            assert (await probe_port("127.0.0.1", closed_port, "127.0.0.1", 2.0))[0] == CLOSED
            outcome, detail = await probe_port("127.0.0.1", open_port, "192.0.2.1", 2.0)  # not our address
            assert outcome == ERROR and detail
            target = ProbeTarget("n2", "127.0.0.1", "127.0.0.1",
                                 (Expectation(closed_port, REFUSED), Expectation(open_port, MESH)))
            result = await probe_target(target, timeout_s=2.0, at=T0)
            assert [(p.port, p.outcome) for p in result.ports] == [(closed_port, CLOSED), (open_port, OPEN)]
        finally:
            s.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
