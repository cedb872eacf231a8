"""The port-scan check without a kernel: the rendered record sets (text and JSON agree, no drift from
their elements), the reading of ``nft -j list set`` output, episodes, members' allowance, blocking."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshnode.checks.local import PORT_SCAN, LocalChecks, deliver
from meshnode.checks.port_scan import PortScanDetector, list_argv, parse_listing, probe_allowance, record_sets
from meshnode.config import ValidateSection
from meshnode.enforce import (
    EnforcementError,
    Packet,
    RenderOptions,
    render,
    ruleset_digest,
    to_iptables,
    to_nft_json,
    to_nft_text,
)
from meshnode.enforce.nft_digest import normalize, normalized_hash
from protocol.trust import PolicyVersion, TrustedState, parse_policy_toml
from simulations.identities import T0, make_authority, make_node

EVIL, EVIL6, MEMBER = "203.0.113.9", "2001:db8::bad", "10.9.0.2"


def _policy(mode: str = "enforce") -> PolicyVersion:
    auth = make_authority()
    doc, rev = parse_policy_toml(f"""
[defaults]
mode = "{mode}"
[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]
""")
    pv = TrustedState(auth.root_bytes).accept_policy(auth.sign_policy(doc, 1, T0, T0 + 86400, rev), T0).policy
    assert pv is not None
    return pv


def _ruleset(window: int = 60, *, abuse_block: bool = False, mode: str = "enforce", inbound: str | None = None):  # type: ignore[no-untyped-def]
    auth = make_authority()
    a = make_node(auth, "node-a", roles=("db",), addresses=("10.9.0.1", "fd09::1"))
    b = make_node(auth, "node-b", roles=("app",), addresses=(MEMBER,))
    opts = RenderOptions(mesh_port=7946, abuse_block=abuse_block, port_scan_window_s=window, default_inbound=inbound)
    return render(_policy(mode), a.cert, [b.cert], opts)


def _listing(pairs: list[tuple[str, int]], name: str = "dropped_v4") -> dict[str, Any]:
    """What ``nft -j list set`` prints (nft 1.0.6): elements with the time they have left."""
    return {"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"set": {"family": "inet", "name": name, "table": "policymesh", "type": ["ipv4_addr", "inet_service"],
                 "handle": 2, "size": 65535, "flags": ["timeout"], "timeout": 60,
                 "elem": [{"elem": {"val": {"concat": [a, p]}, "expires": 42}} for a, p in pairs]}}]}


def _scan(source: str, n: int, first: int = 1000) -> list[tuple[str, int]]:
    return [(source, first + i) for i in range(n)]


# -- rendering ----------------------------------------------------------------------------------------
def test_record_sets_render_just_before_the_default() -> None:
    rs = _ruleset()
    text = to_nft_text(rs)
    assert ("set dropped_v4 {\n\t\ttype ipv4_addr . inet_service\n\t\tflags dynamic,timeout\n\t\ttimeout 60s\n"
            "\t\tsize 65535\n\t}") in text
    assert "\t\ttype ipv6_addr . inet_service\n" in text
    assert ('meta l4proto { tcp, udp } add @dropped_v4 { ip saddr . th dport } comment "port scan record"\n'
            '\t\tmeta l4proto { tcp, udp } add @dropped_v6 { ip6 saddr . th dport } comment "port scan record"\n'
            '\t\tdrop comment "default"\n\t}') in text
    assert [r.verdict for r in rs.rules[-3:]] == ["record", "record", "drop"]
    assert record_sets(rs) == ["dropped_v4", "dropped_v6"]
    # The JSON form: the same sets and rules (the kernel's own listing form, see the netns test).
    cmds = to_nft_json(rs)["nftables"]
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in cmds if "set" in c.get("add", {})}
    assert sets["dropped_v4"]["type"] == ["ipv4_addr", "inet_service"] and sets["dropped_v4"]["timeout"] == 60
    assert sets["dropped_v6"]["size"] == 65535 and "timeout" in sets["dropped_v6"]["flags"]
    record = [c["add"]["rule"] for c in cmds if c.get("add", {}).get("rule", {}).get("comment") == "port scan record"]
    assert record[0]["expr"][1] == {"set": {"op": "add", "set": "@dropped_v4", "elem": {"concat": [
        {"payload": {"protocol": "ip", "field": "saddr"}}, {"payload": {"protocol": "th", "field": "dport"}}]}}}
    # Semantics unchanged: the record rules decide nothing.
    assert rs.evaluate(Packet(src=EVIL, dport=22)) == "drop"
    assert rs.evaluate(Packet(src=MEMBER, dport=5432)) == "accept"


def test_record_sets_off_log_mode_and_reject() -> None:
    off = _ruleset(0)
    assert "dropped" not in to_nft_text(off) and record_sets(off) == []
    assert ruleset_digest(off).hash != ruleset_digest(_ruleset()).hash
    # A policy in log mode drops nothing: nothing to record.
    assert record_sets(_ruleset(mode="log")) == []
    # With reject, the refused attempts are recorded before the rejects.
    rs = _ruleset(inbound="reject")
    assert [r.verdict for r in rs.rules[-4:]] == ["record", "record", "reject", "reject"]
    with pytest.raises(EnforcementError, match="nftables"):
        to_iptables(rs)
    with pytest.raises(EnforcementError, match="port scan window"):
        RenderOptions(mesh_port=7946, port_scan_window_s=-1)


def test_recorded_elements_are_not_drift() -> None:
    rs = _ruleset(abuse_block=True)
    doc = to_nft_json(rs)
    digest = ruleset_digest(rs)
    assert normalized_hash(normalize(doc)) == digest.hash
    added = {"nftables": [*doc["nftables"], {"add": {"element": {
        "family": "inet", "table": "policymesh", "name": "dropped_v4",
        "elem": [{"elem": {"val": {"concat": [EVIL, 22]}, "expires": 30}}]}}}]}
    assert normalized_hash(normalize(added)) == digest.hash
    # The kernel lists the set without "dynamic" (nft 1.0.6) and with its elements: the same hash.
    kernel = json.loads(json.dumps(doc))
    for c in kernel["nftables"]:
        s = c.get("add", {}).get("set")
        if s and s["name"] == "dropped_v4":
            s["flags"] = ["timeout"]
            s["elem"] = _listing([(EVIL, 22)])["nftables"][1]["set"]["elem"]
    assert normalized_hash(normalize(kernel)) == digest.hash
    # But a changed window is: the set's timeout is part of the ruleset.
    assert ruleset_digest(_ruleset(30, abuse_block=True)).hash != digest.hash


# -- reading the kernel's listing ----------------------------------------------------------------------
def test_parse_listing() -> None:
    doc = _listing([(EVIL, 22), (EVIL, 23), (EVIL, 22), ("10.0.0.5", 80)])
    ports, bad = parse_listing(doc)
    assert ports == {EVIL: {22, 23}, "10.0.0.5": {80}} and bad == 0
    v6 = _listing([("2001:0db8::0bad", 443)], "dropped_v6")
    assert parse_listing(v6, ports)[0][EVIL6] == {443}  # canonical text, merged into the same map
    weird = _listing([(EVIL, 22)])
    weird["nftables"][1]["set"]["elem"] += [{"elem": {"val": {"concat": ["nope", 1]}}}, {"concat": [EVIL, 70000]},
                                              {"concat": [EVIL, True]}, 7, {"concat": [EVIL, 25]}]
    ports, bad = parse_listing(weird)
    assert ports == {EVIL: {22, 25}} and bad == 4
    assert parse_listing({"nftables": "x"})[1] == 1 and parse_listing([])[1] == 1
    assert parse_listing({"nftables": [{"set": {"name": "dropped_v4"}}]}) == ({}, 0)  # empty set: no "elem"
    assert list_argv("pm", "dropped_v6") == ["nft", "-j", "list", "set", "inet", "pm", "dropped_v6"]


# -- episodes ------------------------------------------------------------------------------------------
def test_one_episode_per_source_until_quiet() -> None:
    det = PortScanDetector(threshold=10, window_s=60)
    assert det.observe({EVIL: set(range(9))}, 0) == []  # below the threshold
    assert det.observe({EVIL: set(range(10)), "10.0.0.5": {80}}, 10) == [EVIL]
    assert det.observe({EVIL: set(range(5, 40))}, 20) == []  # still the same episode, however many ports
    f = det.findings()[EVIL]
    assert (f.check, f.subject, f.kind, f.severity) == ("port_scan", EVIL, "port_scan", "warning")
    assert f.details["ports"] == 40 and f.details["peak_ports_per_window"] == 35
    assert f.details["sample_ports"] == list(range(20))
    assert det.observe({EVIL: {3}}, 30) == []  # slowed down but not quiet: open
    assert list(det.findings()) == [EVIL]
    # Gone from the sets (its last attempt expired, or the table was replaced and the sets emptied): open
    # for another window, then closed.
    assert det.observe({}, 40) == [] and list(det.findings()) == [EVIL]
    assert det.observe({EVIL: {4}}, 50) == [] and list(det.findings()) == [EVIL]  # back: the same episode
    assert det.observe({}, 109) == [] and list(det.findings()) == [EVIL]
    assert det.observe({}, 110) == [] and det.findings() == {}
    assert det.observe({EVIL: set(range(10))}, 120) == [EVIL]  # a new episode


def test_members_get_the_probe_allowance() -> None:
    allowance = probe_allowance(60, 30, 3)
    assert allowance == 12  # ceil(60 / 22.5) = 3 rounds of 3 refused ports + an open finding's port
    det = PortScanDetector(threshold=20, window_s=60)
    assert det.observe({MEMBER: set(range(31))}, 0, {MEMBER}, allowance) == []
    assert det.observe({MEMBER: set(range(32))}, 1, {MEMBER}, allowance) == [MEMBER]  # a member scanning


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def raise_(self, check: str, subject: str, severity: Any, summary: str, details: Any, now: float) -> None:
        self.calls.append(("raise", check, subject, severity, details["ports"]))

    def resolve(self, check: str, subject: str, now: float) -> None:
        self.calls.append(("resolve", check, subject))


def test_local_checks_round_alerts_once_and_blocks() -> None:
    rs = _ruleset(abuse_block=True)
    checks = LocalChecks(ValidateSection(port_scan_ports=10, block_abusers_s=300), table="policymesh", mesh_port=7946)
    sink = Sink()
    scan = [_listing(_scan(EVIL, 15) + _scan(MEMBER, 15)), _listing([], "dropped_v6")]
    changes, blocks = checks.port_scan_round(scan, rs, 0.0)
    deliver(sink, PORT_SCAN, changes, 0.0)
    assert sink.calls == [("raise", "port_scan", EVIL, "warning", 15)]  # the member is within its allowance
    assert blocks == [(EVIL, ["nft", "add", "element", "inet", "policymesh", "abusers_v4", f"{{ {EVIL} timeout 300s }}"])]
    for t in (10.0, 20.0, 30.0):  # it goes on: no repeat, no second block
        changes, blocks = checks.port_scan_round(scan, rs, t)
        deliver(sink, PORT_SCAN, changes, t)
        assert blocks == []
    for t in (40.0, 89.0):  # quiet, but not for a window yet (the last attempt listed at 30)
        changes, blocks = checks.port_scan_round([_listing([])], rs, t)
        deliver(sink, PORT_SCAN, changes, t)
    assert len(sink.calls) == 1
    changes, blocks = checks.port_scan_round([_listing([])], rs, 90.0)
    deliver(sink, PORT_SCAN, changes, 90.0)
    assert sink.calls[1:] == [("resolve", "port_scan", EVIL)]
    # Without the block sets in force (or without block_abusers_s) nothing is blocked.
    assert checks.port_scan_round(scan, _ruleset(), 100.0)[1] == []
    quiet = LocalChecks(ValidateSection(port_scan_ports=10), table="policymesh", mesh_port=7946)
    assert quiet.port_scan_round(scan, rs, 0.0)[1] == []
    # Unreadable elements are skipped and counted.
    bad = _listing(_scan(EVIL, 3))
    bad["nftables"][1]["set"]["elem"].append({"concat": ["x", 1]})
    checks.port_scan_round([bad], rs, 200.0)
    assert checks.unreadable_elements == 1


def test_restored_alerts_resolve_or_stay_without_a_repeat() -> None:
    rs = _ruleset()
    checks = LocalChecks(ValidateSection(port_scan_ports=10), table="policymesh", mesh_port=7946)
    checks.restore_port_scans([(EVIL, "old summary"), ("198.51.100.7", "old summary")], 0.0)
    changes, _ = checks.port_scan_round([_listing(_scan(EVIL, 2))], rs, 10.0)
    assert changes.raised == () and changes.resolved == ()  # restored: open, not raised again
    changes, _ = checks.port_scan_round([_listing(_scan(EVIL, 2))], rs, 60.0)  # EVIL still at it, the other gone
    assert changes.raised == () and changes.resolved == ("198.51.100.7",)
    changes, _ = checks.port_scan_round([_listing([])], rs, 120.0)
    assert changes.resolved == (EVIL,)


def test_switched_off_resolves_what_was_open() -> None:
    rs = _ruleset()
    checks = LocalChecks(ValidateSection(port_scan_ports=10), table="policymesh", mesh_port=7946)
    assert checks.port_scan_round([_listing(_scan(EVIL, 12))], rs, 0.0)[0].raised
    checks.reconfigure(ValidateSection(port_scan_ports=0), table="policymesh", mesh_port=7946)
    assert checks.scan_detector is None
    assert checks.port_scan_round([], rs, 1.0)[0].resolved == (EVIL,)
