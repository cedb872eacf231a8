"""Backends against the real kernel (inside a throwaway network namespace), plus the file backend.

Root tests are marked ``root`` and skipped with a reason when not root or when the tools are missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.enforce import (
    AddressSet,
    EnforcementError,
    FilterRule,
    IptablesBackend,
    NftBackend,
    RenderOptions,
    Ruleset,
    make_backend,
    render,
    ruleset_digest,
    to_iptables,
    to_nft_json,
    to_nft_text,
)
from meshnode.enforce.iptables import chain_name
from protocol.trust import Certificate, build_policy, parse_policy_toml
from simulations.identities import T0, make_authority, make_node
from tests.netns import Lab, skip_reason

OPTS = RenderOptions(mesh_port=7946, break_glass_cidrs=("198.51.100.0/24", "203.0.113.7/32", "2001:db8:7::1/128"))
KITCHEN_SINK = """
[defaults]
inbound = "reject"
mode = "enforce"

[[allow]]
name = "app-to-db"
from = ["role:app", "node:node-c", "cidr:192.0.2.0/24", "cidr:2001:db8::/64", "cidr:0.0.0.0/0"]
to = ["role:db"]
ports = ["tcp/5432", "udp/53", "icmp", "tcp/1-20", "tcp/30", "tcp/40", "tcp/50", "tcp/60", "tcp/70",
         "tcp/80-81", "tcp/90", "tcp/100", "tcp/110", "tcp/120", "tcp/130", "tcp/140", "tcp/150"]

[[allow]]
name = "web-to-app"
from = ["role:*"]
to = ["role:app"]
ports = ["tcp/8080", "tcp/9000-9010"]
mode = "log"
"""
SIMPLE = """
[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]
"""


class Scenario:
    def __init__(self) -> None:
        self.auth = make_authority()
        self.a = make_node(self.auth, "node-a", roles=("db", "app"), addresses=("10.9.0.1", "fd09::1")).cert
        self.b = make_node(self.auth, "node-b", roles=("app",), addresses=("10.9.0.2", "fd09::2")).cert
        self.c = make_node(self.auth, "node-c", roles=("web",), addresses=("10.9.0.3",)).cert
        self.d = make_node(self.auth, "node-d", roles=("app",), addresses=("10.9.0.4", "fd09::4")).cert

    def ruleset(self, toml: str = SIMPLE, members: list[Certificate] | None = None, serial: int = 1) -> Ruleset:
        doc, rev = parse_policy_toml(toml)
        pv = build_policy("test", serial, T0, T0 + 86400, 1, doc, rev)
        return render(pv, self.a, members if members is not None else [self.b, self.c], OPTS)


@pytest.fixture(scope="module")
def sc() -> Scenario:
    return Scenario()


def broken(rs: Ruleset) -> Ruleset:
    """The same ruleset with a set element no kernel accepts (the renderer never produces this)."""
    bad = tuple(AddressSet(s.name, s.family, s.interval, s.elements + ("10.9.0.300",) if s.family == "ip" else s.elements)
                for s in rs.sets)
    return Ruleset(rs.table, bad, rs.rules, rs.node_id, rs.policy_serial)


# -- file backend and the factory (no root needed) -----------------------------------------------------
def test_file_backend_needs_the_override(tmp_path: Path) -> None:
    with pytest.raises(EnforcementError, match="allow_file_backend"):
        make_backend("file", OPTS, file_path=tmp_path / "r.nft")
    with pytest.raises(EnforcementError, match="unknown enforcement backend"):
        make_backend("pf", OPTS)


def test_file_backend_writes_and_repairs_drift(tmp_path: Path, sc: Scenario) -> None:
    path = tmp_path / "out" / "ruleset.nft"
    be = make_backend("file", OPTS, file_path=path, allow_file_backend=True)
    assert be.check_drift().checked is False
    rs = sc.ruleset()
    res = be.apply(rs)
    assert res.backend == "file" and path.read_text() == to_nft_text(rs) and be.applied_hash == ruleset_digest(rs).hash
    assert be.check_drift().drifted is False
    path.write_text("table inet policymesh { }\n")
    d = be.check_drift()
    assert d.drifted and d.repaired and d.drift_count == 1
    assert [e.name for e in d.events] == ["enforce.drift_detected", "enforce.drift_repaired"]
    assert path.read_text() == to_nft_text(rs)
    path.unlink()
    assert be.check_drift().repaired and path.exists()
    js = make_backend("file", OPTS, file_path=tmp_path / "r.json", allow_file_backend=True, file_format="json")
    js.apply(rs)
    assert json.loads((tmp_path / "r.json").read_text()) == to_nft_json(rs)


def test_backends_refuse_a_ruleset_for_another_table(sc: Scenario, tmp_path: Path) -> None:
    other = render(None, sc.a, [], RenderOptions(mesh_port=7946, table="other"))
    with pytest.raises(EnforcementError, match="table"):
        make_backend("file", OPTS, file_path=tmp_path / "x", allow_file_backend=True).apply(other)


# -- kernel ------------------------------------------------------------------------------------------
NFT_SKIP = skip_reason("nft")
IPT_SKIP = skip_reason("nft", "iptables-restore", "ip6tables-restore", "iptables-save", "ipset")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = skip_reason("nft")
    if reason:
        pytest.skip(reason)
    lab = Lab(hosts=("k",), bridge=False)
    try:
        lab.up()
    except RuntimeError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def ns(lab: Lab) -> str:
    lab.reset_firewall("k")
    return lab.ns["k"]


def nft_list(lab: Lab, *what: str) -> str:
    return lab.exec("k", ["nft", "list", *what]).stdout.decode()


def rule_handles(lab: Lab) -> list[int]:
    doc = json.loads(lab.exec("k", ["nft", "-j", "list", "table", "inet", "policymesh"]).stdout)
    return [e["rule"]["handle"] for e in doc["nftables"] if "rule" in e]


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_kernel_readback_equals_the_rendered_hash(lab: Lab, ns: str, sc: Scenario, tmp_path: Path) -> None:
    rs = sc.ruleset(KITCHEN_SINK, [sc.b, sc.c, sc.d])
    be = NftBackend("policymesh", netns=ns)
    res = be.apply(rs)
    assert res.exact and res.kernel_hash == ruleset_digest(rs).hash == be.read_kernel_hash()
    # the text form, loaded the way an operator would, gives the very same kernel state
    be.remove()
    assert be.read_kernel_hash() is None
    (tmp_path / "r.nft").write_text(to_nft_text(rs))
    lab.exec("k", ["nft", "-f", str(tmp_path / "r.nft")])
    assert be.read_kernel_hash() == ruleset_digest(rs).hash


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_loading_twice_or_over_an_older_version_touches_no_other_table(lab: Lab, ns: str, sc: Scenario,
                                                                           tmp_path: Path) -> None:
    lab.exec("k", ["nft", "-f", "-"], stdin=b"""
        table inet other {
            set s { type ipv4_addr; elements = { 10.0.0.1 }; }
            chain c {
                type filter hook input priority 10; policy accept;
                tcp dport 22 counter
            }
        }
        table ip filter {
            chain INPUT {
                type filter hook input priority 0; policy accept;
                udp dport 53 accept
            }
        }
    """)
    others = nft_list(lab, "table", "inet", "other") + nft_list(lab, "table", "ip", "filter")
    v1, v2 = sc.ruleset(SIMPLE), sc.ruleset(KITCHEN_SINK, serial=2)
    for rs in (v1, v1, v2, v1):
        path = tmp_path / "r.nft"
        path.write_text(to_nft_text(rs))
        lab.exec("k", ["nft", "-f", str(path)])
        assert NftBackend("policymesh", netns=ns).read_kernel_hash() == ruleset_digest(rs).hash
    assert nft_list(lab, "table", "inet", "other") + nft_list(lab, "table", "ip", "filter") == others
    tables = nft_list(lab, "tables").split("\n")
    assert sorted(t for t in tables if t) == ["table inet other", "table inet policymesh", "table ip filter"]


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_failed_apply_keeps_the_previous_ruleset(lab: Lab, ns: str, sc: Scenario) -> None:
    be = NftBackend("policymesh", netns=ns)
    good = sc.ruleset()
    be.apply(good)
    with pytest.raises(EnforcementError, match="nft -j -f failed"):
        be.apply(broken(sc.ruleset(KITCHEN_SINK, serial=2)))
    assert be.read_kernel_hash() == ruleset_digest(good).hash and be.applied is good
    assert be.check_drift().drifted is False


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_member_changes_update_sets_in_place(lab: Lab, ns: str, sc: Scenario) -> None:
    be = NftBackend("policymesh", netns=ns)
    be.apply(sc.ruleset(members=[sc.b, sc.c]))
    handles = rule_handles(lab)
    grown = sc.ruleset(members=[sc.b, sc.c, sc.d], serial=2)
    res = be.apply(grown)
    assert res.mode == "sets" and set(res.changed_sets) == {"members_v4", "members_v6", "role_app_v4", "role_app_v6"}
    assert rule_handles(lab) == handles  # the rules were not replaced
    assert be.read_kernel_hash() == ruleset_digest(grown).hash
    assert "10.9.0.4" in nft_list(lab, "set", "inet", "policymesh", "role_app_v4")
    shrunk = sc.ruleset(members=[sc.c], serial=3)
    assert be.update_sets(shrunk).mode == "sets"
    assert "10.9.0.2" not in nft_list(lab, "set", "inet", "policymesh", "role_app_v4")
    # an element slipped in behind our back: the in-place update notices and replaces the whole table
    lab.exec("k", ["nft", "add element inet policymesh role_app_v4 { 10.66.0.1 }"])
    res = be.apply(grown)
    assert res.mode == "full" and be.read_kernel_hash() == ruleset_digest(grown).hash
    assert "10.66.0.1" not in nft_list(lab, "set", "inet", "policymesh", "role_app_v4")
    with pytest.raises(EnforcementError, match="rules changed"):
        be.update_sets(sc.ruleset(KITCHEN_SINK, serial=4))
    assert be.apply(sc.ruleset(KITCHEN_SINK, serial=4)).mode == "full"
    # a set update over a table someone deleted falls back to a full replace
    lab.exec("k", ["nft", "delete", "table", "inet", "policymesh"])
    res = be.apply(sc.ruleset(KITCHEN_SINK, members=[sc.b], serial=5))
    assert res.mode == "full" and be.read_kernel_hash() == res.hash


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
@pytest.mark.parametrize("tamper", [
    "flush table inet policymesh",
    "delete table inet policymesh",
    "insert rule inet policymesh input tcp dport 22 accept",
    "add element inet policymesh members_v4 { 10.66.0.1 }",
    "delete rule inet policymesh input handle HANDLE",
    "add chain inet policymesh sneaky",
])
def test_nft_drift_is_detected_counted_and_repaired(lab: Lab, ns: str, sc: Scenario, tamper: str) -> None:
    be = NftBackend("policymesh", netns=ns)
    assert be.check_drift().checked is False
    rs = sc.ruleset(KITCHEN_SINK)
    be.apply(rs)
    assert be.check_drift().drifted is False
    lab.exec("k", ["nft", tamper.replace("HANDLE", str(rule_handles(lab)[-1]))])
    seen = be.check_drift(repair=False)
    assert seen.drifted and not seen.repaired and seen.actual_hash != ruleset_digest(rs).hash
    d = be.check_drift()
    assert d.drifted and d.repaired and d.error is None and d.drift_count == 2
    assert [e.name for e in d.events] == ["enforce.drift_detected", "enforce.drift_repaired"]
    assert d.events[0].facts["expected"] == ruleset_digest(rs).hash
    assert be.read_kernel_hash() == ruleset_digest(rs).hash
    assert be.check_drift().drifted is False


@pytest.mark.root
@pytest.mark.skipif(IPT_SKIP is not None, reason=IPT_SKIP or "")
def test_iptables_touches_only_its_own_chain_and_sets(lab: Lab, ns: str, sc: Scenario) -> None:
    for tool in ("iptables", "ip6tables"):
        lab.exec("k", [tool, "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT"])
        lab.exec("k", [tool, "-N", "OTHER"])
        lab.exec("k", [tool, "-A", "OTHER", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    lab.exec("k", ["ipset", "create", "other-set", "hash:ip"])
    lab.exec("k", ["ipset", "add", "other-set", "10.0.0.1"])
    be = IptablesBackend("policymesh", netns=ns)
    chain = chain_name("policymesh")
    for serial, toml in enumerate((SIMPLE, KITCHEN_SINK, SIMPLE), start=1):
        rs = sc.ruleset(toml, serial=serial)
        res = be.apply(rs)
        assert res.mode == "full" and res.exact and be.check_drift().drifted is False
        for tool in ("iptables", "ip6tables"):
            saved = lab.exec("k", [f"{tool}-save", "-t", "filter"]).stdout.decode().splitlines()
            assert [x for x in saved if x.startswith("-A INPUT")] == [
                f"-A INPUT -j {chain}", "-A INPUT -p udp -m udp --dport 53 -j ACCEPT"]
            assert [x for x in saved if x.startswith("-A OTHER")] == ["-A OTHER -p tcp -m tcp --dport 22 -j ACCEPT"]
            ours = [x for x in saved if x.startswith(f"-A {chain}")]
            assert ours[-1].endswith("-j DROP") and any("--match-set" in x for x in ours)
    sets = lab.exec("k", ["ipset", "list", "-n"]).stdout.decode().split()
    assert "other-set" in sets
    assert {s.rsplit("-", 2)[1] for s in sets if s.startswith("policymesh-")} == {"a"}  # old generations destroyed
    assert "10.0.0.1" in lab.exec("k", ["ipset", "list", "other-set"]).stdout.decode()
    be.remove()
    saved = lab.exec("k", ["iptables-save", "-t", "filter"]).stdout.decode()
    assert chain not in saved and "-A OTHER" in saved and "--dport 53" in saved
    assert lab.exec("k", ["ipset", "list", "-n"]).stdout.decode().split() == ["other-set"]


@pytest.mark.root
@pytest.mark.skipif(IPT_SKIP is not None, reason=IPT_SKIP or "")
def test_iptables_failed_apply_keeps_the_previous_ruleset(lab: Lab, ns: str, sc: Scenario) -> None:
    be = IptablesBackend("policymesh", netns=ns)
    good = sc.ruleset()
    be.apply(good)
    before = be.read_kernel_hash()
    # fails while loading the sets
    with pytest.raises(EnforcementError, match="ipset restore failed"):
        be.apply(broken(sc.ruleset(KITCHEN_SINK, serial=2)))
    assert be.read_kernel_hash() == before and be.applied is good
    # fails in ip6tables-restore, after the sets and the IPv4 chain were loaded: both are rolled back
    rs = sc.ruleset(KITCHEN_SINK, serial=3)
    bad_v6 = Ruleset(rs.table, rs.sets, rs.rules + (FilterRule("drop", family="ip6", proto="icmp", icmp_types=("bogus",)),))
    with pytest.raises(EnforcementError, match="ip6tables-restore"):
        be.apply(bad_v6)
    assert be.read_kernel_hash() == before
    assert be.check_drift().drifted is False


@pytest.mark.root
@pytest.mark.skipif(IPT_SKIP is not None, reason=IPT_SKIP or "")
def test_iptables_set_update_in_place_and_drift_repair(lab: Lab, ns: str, sc: Scenario) -> None:
    be = IptablesBackend("policymesh", netns=ns)
    chain = chain_name("policymesh")
    be.apply(sc.ruleset(members=[sc.b, sc.c]))
    rules_before = lab.exec("k", ["iptables", "-S", chain]).stdout
    res = be.apply(sc.ruleset(members=[sc.b, sc.c, sc.d], serial=2))
    assert res.mode == "sets" and "role_app_v4" in res.changed_sets
    assert lab.exec("k", ["iptables", "-S", chain]).stdout == rules_before
    app_set = to_iptables(sc.ruleset(members=[sc.b, sc.c, sc.d]), be.generation or "a").set_names["role_app_v4"]
    assert "10.9.0.4" in lab.exec("k", ["ipset", "list", app_set]).stdout.decode()
    assert be.check_drift().drifted is False
    tampers = [
        ["iptables", "-F", chain],
        ["ip6tables", "-D", "INPUT", "-j", chain],
        ["iptables", "-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
        ["ipset", "add", app_set, "10.66.0.1"],
        ["iptables", "-I", chain, "1", "-j", "RETURN"],
    ]
    for n, tamper in enumerate(tampers, start=1):
        if tamper[0] == "ipset":
            tamper[2] = to_iptables(sc.ruleset(), be.generation or "a").set_names["role_app_v4"]
        lab.exec("k", tamper)
        d = be.check_drift()
        assert d.drifted and d.repaired and d.drift_count == n, tamper
        assert be.check_drift().drifted is False, tamper
        saved = lab.exec("k", ["iptables-save", "-t", "filter"]).stdout.decode().splitlines()
        assert [x for x in saved if x.startswith("-A INPUT")][0] == f"-A INPUT -j {chain}"
    lab.exec("k", ["iptables", "-D", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_without_json_support_uses_text_and_still_detects_drift(lab: Lab, ns: str, sc: Scenario) -> None:
    """nft builds without JSON: load the text form and compare the kernel's text listing instead."""
    be = NftBackend("policymesh", netns=ns)
    be._json = False  # what json_supported() finds on such a build; everything else is the real nft
    rs = sc.ruleset(KITCHEN_SINK)
    res = be.apply(rs)
    assert res.mode == "full" and not res.exact and res.kernel_hash is not None
    assert NftBackend("policymesh", netns=ns).read_kernel_hash() == ruleset_digest(rs).hash  # the kernel holds exactly rs
    assert be.apply(sc.ruleset(KITCHEN_SINK, members=[sc.b], serial=2)).mode == "full"  # no in-place path
    assert be.check_drift().drifted is False
    lab.exec("k", ["nft", "insert rule inet policymesh input tcp dport 22 accept"])
    d = be.check_drift()
    assert d.drifted and d.repaired and be.check_drift().drifted is False


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_apply_and_drift_checks_from_two_threads_never_see_false_drift(lab: Lab, ns: str, sc: Scenario) -> None:
    """The daemon applies from a worker thread while its drift timer checks from another."""
    import threading

    be = NftBackend("policymesh", netns=ns)
    versions = [sc.ruleset(SIMPLE, serial=1), sc.ruleset(KITCHEN_SINK, serial=2),
                sc.ruleset(KITCHEN_SINK, members=[sc.b, sc.c, sc.d], serial=3)]
    be.apply(versions[0])
    errors: list[BaseException] = []

    def applier() -> None:
        try:
            for i in range(12):
                be.apply(versions[i % 3])
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=applier)
    t.start()
    results = []
    while t.is_alive():
        results.append(be.check_drift())
    t.join()
    assert not errors
    assert results and not any(r.drifted for r in results) and be.drift_count == 0
    assert be.read_kernel_hash() == be.applied_hash == ruleset_digest(versions[11 % 3]).hash


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_nft_deferred_read_back_confirms_or_catches_drift(lab: Lab, ns: str, sc: Scenario) -> None:
    """``read_back_later``: only after a read-back proved this nft lists our rulesets exactly; the kernel
    holds the ruleset once the load returns; the next drift check reads it back (and repairs a change made
    in between, as drift)."""
    be = NftBackend("policymesh", netns=ns)
    be.edit_min_rules = 0  # edits at any size
    first = be.apply(sc.ruleset(serial=1), read_back_later=True)
    assert first.verified and first.kernel_hash == first.hash  # not proven yet: read back at once
    res = be.apply(sc.ruleset(KITCHEN_SINK, serial=2), read_back_later=True)
    assert not res.verified and res.kernel_hash is None and be.read_back_pending
    assert be.read_kernel_hash() == res.hash  # the kernel holds it already
    ok = be.check_drift()
    assert ok.checked and not ok.drifted and not be.read_back_pending and be.drift_count == 0
    same = be.apply(sc.ruleset(KITCHEN_SINK, serial=3), read_back_later=True)  # renders the same ruleset
    # nothing loaded, and the last read-back found exactly this ruleset: nothing to read back
    assert same.mode == "sets" and same.hash == res.hash and same.verified and not be.read_back_pending
    edited = be.apply(sc.ruleset(KITCHEN_SINK.replace("tcp/8080", "tcp/8081"), serial=4), read_back_later=True)
    assert edited.mode == "rules" and not edited.verified
    again = be.apply(sc.ruleset(KITCHEN_SINK.replace("tcp/8080", "tcp/8081"), serial=5), read_back_later=True)
    assert again.mode == "sets" and not again.verified and be.read_back_pending  # the edit is not read back yet
    assert not be.check_drift().drifted and not be.read_back_pending
    res = be.apply(sc.ruleset(serial=6), read_back_later=True)
    assert not res.verified
    lab.exec("k", ["nft", "insert rule inet policymesh input tcp dport 22 accept"])
    d = be.check_drift()
    assert d.drifted and d.repaired and d.drift_count == 1 and d.expected_hash == res.hash
    assert [e.name for e in d.events] == ["enforce.drift_detected", "enforce.drift_repaired"]
    assert be.read_kernel_hash() == res.hash and not be.read_back_pending
