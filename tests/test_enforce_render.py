"""Renderer unit tests: golden outputs and the safety rules, checked through the ruleset's semantics.

Regenerate the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_enforce_render.py``
and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from meshnode.enforce import (
    EnforcementError,
    Packet,
    RenderOptions,
    Ruleset,
    render,
    ruleset_digest,
    to_iptables,
    to_nft_json,
    to_nft_text,
)
from meshnode.enforce.iptables import MULTIPORT_SLOTS
from meshnode.enforce.model import MAX_LOG_PREFIX
from meshnode.examples import sample_policy_toml
from protocol.errors import RevokedError
from protocol.trust import (
    Certificate,
    Defaults,
    PolicyDocument,
    PolicyVersion,
    Revocations,
    build_policy,
    parse_policy_toml,
)
from simulations.identities import T0, make_authority, make_node

GOLDEN = Path(__file__).parent / "golden"
MESH = 7946
OPTS = RenderOptions(mesh_port=MESH, admin_port=9946)

SAMPLE_TOML = """
[defaults]
inbound = "drop"
mode = "enforce"

[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]

[[allow]]
name = "web-to-app"
from = ["role:web", "node:node-d"]
to = ["role:app"]
ports = ["tcp/8080", "tcp/9000-9010", "tcp/9005"]
mode = "log"

[[allow]]
name = "monitoring"
from = ["cidr:192.0.2.0/24", "cidr:192.0.2.128/25", "cidr:2001:db8::/64", "role:monitor"]
to = ["role:*"]
ports = ["udp/161", "icmp", "tcp/9100"]

[[allow]]
name = "not-for-me"
from = ["role:app"]
to = ["role:cache", "node:node-z"]
ports = ["tcp/6379"]

[revoke]
nodes = ["node-e"]
certs = []
"""


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden output (UPDATE_GOLDEN=1 to accept)"


class Sample:
    """Seven members; node-e is revoked by node id, node-f by cert id (added per test), node-g expired."""

    def __init__(self) -> None:
        self.auth = make_authority()
        mk = self.mk
        self.a = mk("node-a", ("db", "app"), ("10.1.0.1", "fd01::1"))
        self.b = mk("node-b", ("app",), ("10.1.0.2", "fd01::2"))
        self.c = mk("node-c", ("web",), ("10.1.0.3",))
        self.d = mk("node-d", ("batch",), ("fd01::4",))
        self.e = mk("node-e", ("app",), ("10.1.0.5",))
        self.f = mk("node-f", ("monitor",), ("10.1.0.6",))
        self.g = mk("node-g", ("app",), ("10.1.0.7",), valid_s=100)
        self.doc, self.rev = parse_policy_toml(SAMPLE_TOML)

    def mk(self, node_id: str, roles: tuple[str, ...], addrs: tuple[str, ...], valid_s: int = 365 * 86400) -> Certificate:
        return make_node(self.auth, node_id, roles=roles, addresses=addrs, valid_s=valid_s).cert

    @property
    def members(self) -> list[Certificate]:
        return [self.b, self.c, self.d, self.e, self.f, self.g]

    def policy(self, serial: int = 1, doc: PolicyDocument | None = None, rev: Revocations | None = None) -> PolicyVersion:
        return build_policy("test", serial, T0, T0 + 7 * 86400, 1, doc or self.doc, rev if rev is not None else self.rev)


@pytest.fixture(scope="module")
def sample() -> Sample:
    return Sample()


def sets_containing(rs: Ruleset, addr: str) -> list[str]:
    return [s.name for s in rs.sets if addr in s.elements]


def verdict(rs: Ruleset, src: str, dport: int | None = None, proto: str = "tcp", **kw: object) -> str:
    return rs.evaluate(Packet(src=src, proto=proto, dport=dport, **kw))  # type: ignore[arg-type]


# -- golden outputs ------------------------------------------------------------------------------------
def test_golden_sample(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS, now=T0 + 1000)
    golden("enforce_sample.nft", to_nft_text(rs))
    golden("enforce_sample.json", json.dumps(to_nft_json(rs), indent=2) + "\n")
    golden("enforce_sample.iptables", to_iptables(rs).text())


def test_golden_no_policy(sample: Sample) -> None:
    rs = render(None, sample.a, sample.members, RenderOptions(mesh_port=MESH, break_glass_cidrs=("198.51.100.0/24",)))
    golden("enforce_nopolicy.nft", to_nft_text(rs))


def test_golden_log_mode_reject(sample: Sample) -> None:
    doc = PolicyDocument(defaults=Defaults(inbound="reject", mode="log"), allow=(
        sample.doc.allow[0].__class__(name="db-strict", sources=("role:app",), to=("role:db",), ports=("tcp/5432",),
                                      mode="enforce"),
    ))
    rs = render(sample.policy(doc=doc), sample.a, sample.members, RenderOptions(mesh_port=MESH, icmp_essential=False))
    golden("enforce_logmode.nft", to_nft_text(rs))


# -- pinned digests of the option variants the golden files do not show ------------------------------
# sha256 of the nftables text and the iptables rendering (or its refusal) of the sample members under each
# variant.  A change here changes what operators' kernels hold: review the rendered diff, then re-pin.
PINNED_VARIANTS: dict[str, tuple[str, RenderOptions, str]] = {
    "abuse-block-and-port-scan": (
        "sample", RenderOptions(mesh_port=MESH, abuse_block=True, port_scan_window_s=120),
        "cfb9f5ec5101953474eceaa9e85d436791f54026405a1df9a45e0aaf21a4883f"),
    "mesh-join-any-reject": (
        "sample", RenderOptions(mesh_port=MESH, mesh_join_cidrs=("0.0.0.0/0", "::/0"), default_inbound="reject"),
        "90aafd3d421733760835198d754a1cc29b00090bfc726c50670cd2a507d95e71"),
    "mesh-join-and-break-glass": (
        "example", RenderOptions(mesh_port=MESH, mesh_join_cidrs=("10.9.0.0/16", "2001:db8::/32"),
                                 break_glass_cidrs=("198.51.100.0/24", "2001:db8:1::/48"), icmp_essential=False),
        "d83db222792788cd6646c854a78c632ebc3a12997f53ae0b96d76544777be5d4"),
    "log-mode-enforced-exception": (
        "log-mode", RenderOptions(mesh_port=MESH, port_scan_window_s=60),
        "4cb688884a058f9b13340fed0f18b47e2ea6cef49160a2c3e3715b544469ded8"),
}


def _variant_policy(sample: Sample, name: str) -> PolicyVersion:
    if name == "sample":
        return sample.policy()
    if name == "example":
        doc, rev = parse_policy_toml(sample_policy_toml())
        return sample.policy(doc=doc, rev=rev)
    allow = (*sample.doc.allow, sample.doc.allow[0].__class__(
        name="db-strict", sources=("role:app",), to=("role:db",), ports=("tcp/5432", "udp/53"), mode="enforce"))
    return sample.policy(doc=PolicyDocument(defaults=Defaults(inbound="reject", mode="log"), allow=allow))


@pytest.mark.parametrize("variant", sorted(PINNED_VARIANTS))
def test_pinned_rendering_of_option_variants(sample: Sample, variant: str) -> None:
    policy_name, opts, pinned = PINNED_VARIANTS[variant]
    rs = render(_variant_policy(sample, policy_name), sample.a, sample.members, opts, now=T0 + 1000)
    try:
        iptables = to_iptables(rs).text()
    except EnforcementError as exc:
        iptables = f"refused: {exc}"
    digest = hashlib.sha256(f"{to_nft_text(rs)}\n{iptables}".encode()).hexdigest()
    assert digest == pinned, f"rendering of {variant} changed: {digest}"


# -- structure -----------------------------------------------------------------------------------------
def test_chain_starts_with_the_fixed_prologue_and_ends_with_the_default(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS)
    comments = [r.comment for r in rs.rules]
    assert comments[:3] == ["established", "invalid", "loopback"]
    assert comments[3:7] == ["mesh interlock", "mesh interlock (datagrams)"] * 2
    assert comments[-1] == "default" and rs.rules[-1].verdict == "drop"
    assert to_nft_json(rs)["nftables"][-len(rs.rules) - 1]["add"]["chain"]["policy"] == "drop"
    assert "policy drop;" in to_nft_text(rs)


def test_only_rules_whose_to_matches_this_node(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS)
    comments = {r.comment for r in rs.rules}
    assert {"allow app-to-db", "allow web-to-app", "allow monitoring"} <= comments
    assert "allow not-for-me" not in comments
    # node-c (web) is the target of nothing but role:* rules
    rs_c = render(sample.policy(), sample.c, [sample.a, sample.b], OPTS)
    assert {r.comment for r in rs_c.rules if r.comment.startswith("allow")} == {"allow monitoring"}


def test_rule_count_depends_on_rules_not_on_members(sample: Sample) -> None:
    small = render(sample.policy(), sample.a, sample.members, OPTS)
    many = [
        Certificate(cluster="test", node_id=f"n{i}", region="r1", roles=(("app", "web", "monitor")[i % 3],),
                    addresses=(f"10.{2 + i // 65536}.{(i // 256) % 256}.{i % 256}", f"fd02::{i:x}"),
                    identity_key=bytes(32), static_key=bytes(32), not_before=0, not_after=T0 * 2, cert_id=f"c{i}")
        for i in range(3000)
    ]
    large = render(sample.policy(), sample.a, many, OPTS)
    assert large.rule_count == small.rule_count
    assert ruleset_digest(large).structure_hash == ruleset_digest(small).structure_hash
    assert ruleset_digest(large).hash != ruleset_digest(small).hash
    assert large.element_count > 6000


def test_sources_are_named_sets_per_role_and_family(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS, now=T0)
    assert rs.set_by_name("role_app_v4").elements == ("10.1.0.1", "10.1.0.2", "10.1.0.7")
    assert rs.set_by_name("role_app_v6").elements == ("fd01::1", "fd01::2")
    assert rs.set_by_name("node_node-d_v6").elements == ("fd01::4",)
    assert rs.set_by_name("node_node-d_v4").elements == ()
    # CIDR sources are collapsed (192.0.2.128/25 is inside 192.0.2.0/24) and kept per rule and family
    assert rs.set_by_name("cidr_monitoring_v4").elements == ("192.0.2.0/24",)
    assert rs.set_by_name("cidr_monitoring_v6").elements == ("2001:db8::/64",)
    assert rs.set_by_name("cidr_monitoring_v4").interval
    # overlapping ports are merged (nft refuses overlapping intervals in one set)
    web = [r for r in rs.rules if r.comment == "allow web-to-app"]
    assert all(r.ports == ((8080, 8080), (9000, 9010)) for r in web)


def test_semantics_of_the_sample(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS, now=T0)
    assert verdict(rs, "10.1.0.2", 5432) == "accept"  # app -> db
    assert verdict(rs, "fd01::2", 5432) == "accept"
    assert verdict(rs, "10.1.0.3", 5432) == "drop"  # web is not app
    assert verdict(rs, "10.1.0.3", 9005) == "accept"  # web -> app
    assert verdict(rs, "fd01::4", 8080) == "accept"  # node:node-d
    assert verdict(rs, "192.0.2.77", 161, proto="udp") == "accept"
    assert verdict(rs, "192.0.2.77", 161) == "drop"  # udp only
    assert verdict(rs, "192.0.2.77", proto="icmp", icmp_type="echo-request") == "accept"
    assert verdict(rs, "203.0.113.9", proto="icmp", icmp_type="echo-request") == "drop"
    assert verdict(rs, "203.0.113.9", proto="icmp", icmp_type="destination-unreachable") == "accept"
    assert verdict(rs, "10.1.0.2", 22) == "drop"
    assert verdict(rs, "203.0.113.9", 22, iif="lo") == "accept"
    assert verdict(rs, "203.0.113.9", 22, ct_state="established") == "accept"
    assert verdict(rs, "10.1.0.2", MESH, ct_state="invalid") == "drop"
    # web-to-app is in log mode: other sources on its ports are logged and accepted, not dropped
    assert verdict(rs, "203.0.113.9", 8080) == "accept"
    assert verdict(rs, "203.0.113.9", 8081) == "drop"
    log_rules = [r for r in rs.rules if r.verdict == "log"]
    assert log_rules and all(r.limit == "5/second" for r in log_rules)


# -- safety rules --------------------------------------------------------------------------------------
def test_no_policy_still_drops_and_keeps_loopback_and_mesh(sample: Sample) -> None:
    rs = render(None, sample.a, sample.members, OPTS)
    assert rs.policy_serial is None and rs.default_action == "drop"
    for addr in ("10.1.0.2", "fd01::2", "10.1.0.3", "fd01::4"):
        assert verdict(rs, addr, MESH) == "accept"
        assert verdict(rs, addr, 5432) == "drop"
    assert verdict(rs, "203.0.113.9", MESH) == "drop"
    assert verdict(rs, "203.0.113.9", 5432, iif="lo") == "accept"
    assert not any(r.verdict == "accept" and r.is_unconditional() for r in rs.rules)


def test_empty_policy_is_no_allow_all(sample: Sample) -> None:
    rs = render(sample.policy(doc=PolicyDocument(), rev=Revocations()), sample.a, sample.members, OPTS)
    assert [r.comment for r in rs.rules if r.comment.startswith("allow")] == []
    assert verdict(rs, "10.1.0.2", 5432) == "drop"
    assert verdict(rs, "10.1.0.2", MESH) == "accept"


def test_invalid_policy_document_is_refused_not_rendered(sample: Sample) -> None:
    bad = PolicyVersion(cluster="test", serial=3, issued_at=T0, expires_at=T0 + 10, root_version=1,
                        document=PolicyDocument(defaults=Defaults(inbound="accept")))
    with pytest.raises(EnforcementError, match="invalid"):
        render(bad, sample.a, sample.members, OPTS)
    bad_port = PolicyVersion(cluster="test", serial=3, issued_at=T0, expires_at=T0 + 10, root_version=1,
                             document=PolicyDocument(allow=(sample.doc.allow[0].__class__(
                                 name="x", sources=("role:app",), to=("role:*",), ports=("tcp/0-65535",)),)))
    with pytest.raises(EnforcementError):
        render(bad_port, sample.a, sample.members, OPTS)


def test_an_accept_default_is_refused_in_options() -> None:
    with pytest.raises(EnforcementError, match="never accepted"):
        RenderOptions(mesh_port=MESH, default_inbound="accept")


def test_options_override_the_inbound_action(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, RenderOptions(mesh_port=MESH, default_inbound="reject"))
    assert rs.default_action == "reject"
    assert verdict(rs, "203.0.113.9", 22) == "reject"
    assert verdict(rs, "203.0.113.9", 53, proto="udp") == "reject"
    tcp_reset = [r for r in rs.rules if r.verdict == "reject" and r.proto == "tcp"]
    assert tcp_reset and "reject with tcp reset" in to_nft_text(rs)


def test_revoked_nodes_leave_every_set(sample: Sample) -> None:
    rev = Revocations(nodes=("node-e",), certs=(sample.f.cert_id,))
    before = render(sample.policy(1, rev=Revocations()), sample.a, sample.members, OPTS)
    assert sets_containing(before, "10.1.0.5") and sets_containing(before, "10.1.0.6")
    after = render(sample.policy(2, rev=rev), sample.a, sample.members, OPTS)
    assert sets_containing(after, "10.1.0.5") == []
    assert sets_containing(after, "10.1.0.6") == []
    assert verdict(after, "10.1.0.5", MESH) == "drop"
    assert {(x.node_id, x.reason) for x in after.excluded} == {("node-e", "node revoked"),
                                                                ("node-f", "certificate revoked")}
    assert "# excluded: node-e" in to_nft_text(after)


def test_own_node_revoked_is_refused(sample: Sample) -> None:
    with pytest.raises(RevokedError):
        render(sample.policy(rev=Revocations(nodes=("node-a",))), sample.a, sample.members, OPTS)


def test_expired_members_are_left_out_when_now_is_given(sample: Sample) -> None:
    rs = render(sample.policy(), sample.a, sample.members, OPTS, now=T0 + 3600)
    assert sets_containing(rs, "10.1.0.7") == []
    assert ("node-g", "certificate expired") in {(x.node_id, x.reason) for x in rs.excluded}
    future = Certificate(**{**_fields(sample.b), "node_id": "node-h", "cert_id": "h1", "not_before": T0 + 10_000,
                            "addresses": ("10.1.0.8",)})
    rs = render(sample.policy(), sample.a, [future], OPTS, now=T0)
    assert sets_containing(rs, "10.1.0.8") == []


def test_other_cluster_and_scoped_addresses_are_left_out(sample: Sample) -> None:
    other = Certificate(**{**_fields(sample.b), "cluster": "other", "cert_id": "o1", "addresses": ("10.9.9.9",)})
    scoped = Certificate(**{**_fields(sample.b), "node_id": "node-s", "cert_id": "s1",
                            "addresses": ("fe80::1%eth0", "10.1.0.9")})
    rs = render(sample.policy(), sample.a, [other, scoped], OPTS)
    assert sets_containing(rs, "10.9.9.9") == []
    assert sets_containing(rs, "10.1.0.9") != []
    assert not any("fe80" in e for s in rs.sets for e in s.elements)


def test_expired_policy_is_rendered_as_given(sample: Sample) -> None:
    """Fail-static is the caller's decision: the renderer does not look at the policy's expiry."""
    old = sample.policy()
    members = [sample.b, sample.c, sample.d]
    late = render(old, sample.a, members, OPTS, now=old.expires_at + 10**6)
    assert ruleset_digest(late).hash == ruleset_digest(render(old, sample.a, members, OPTS, now=T0)).hash
    assert late.policy_serial == old.serial and "allow app-to-db" in {r.comment for r in late.rules}


def test_membership_order_and_duplicates_change_nothing(sample: Sample) -> None:
    one = render(sample.policy(), sample.a, sample.members, OPTS)
    two = render(sample.policy(), sample.a, list(reversed(sample.members)) + sample.members, OPTS)
    assert ruleset_digest(one).hash == ruleset_digest(two).hash and to_nft_text(one) == to_nft_text(two)


def test_same_rules_at_a_new_serial_hash_the_same(sample: Sample) -> None:
    assert ruleset_digest(render(sample.policy(1), sample.a, sample.members, OPTS)).hash == \
        ruleset_digest(render(sample.policy(2), sample.a, sample.members, OPTS)).hash


def test_break_glass_is_accepted_on_every_port(sample: Sample) -> None:
    opts = RenderOptions(mesh_port=MESH, break_glass_cidrs=("198.51.100.0/24", "2001:db8:1::/48"))
    rs = render(sample.policy(), sample.a, sample.members, opts)
    assert verdict(rs, "198.51.100.20", 22) == "accept"
    assert verdict(rs, "2001:db8:1::5", 22) == "accept"
    assert verdict(rs, "198.51.101.20", 22) == "drop"
    with pytest.raises(EnforcementError, match="break-glass"):
        RenderOptions(mesh_port=MESH, break_glass_cidrs=("10.0.0.1/8",))


def test_icmp_essential_can_be_disabled(sample: Sample) -> None:
    on = render(None, sample.a, [], OPTS)
    off = render(None, sample.a, [], RenderOptions(mesh_port=MESH, icmp_essential=False))
    assert verdict(on, "203.0.113.9", proto="icmp", icmp_type="packet-too-big") == "drop"  # v4 has no such type
    assert verdict(on, "2001:db8::9", proto="icmp", icmp_type="packet-too-big") == "accept"
    assert verdict(off, "2001:db8::9", proto="icmp", icmp_type="packet-too-big") == "drop"
    chain = to_nft_text(off).split("chain input")[1]
    assert "icmp type" not in chain and "packet-too-big" not in chain
    assert verdict(off, "fe80::9", proto="icmp", icmp_type="nd-neighbor-solicit") == "accept"  # IPv6 keeps working


def test_policy_log_mode_logs_instead_of_dropping_and_enforced_rules_still_drop(sample: Sample) -> None:
    R = sample.doc.allow[0].__class__
    doc = PolicyDocument(defaults=Defaults(mode="log"), allow=(
        R(name="db", sources=("role:app",), to=("role:db",), ports=("tcp/5432",), mode="enforce"),
        R(name="metrics", sources=("role:monitor",), to=("role:*",), ports=("tcp/9100",)),
    ))
    rs = render(sample.policy(doc=doc), sample.a, sample.members, OPTS)
    assert rs.default_action == "log"
    assert verdict(rs, "203.0.113.9", 22) == "accept"  # logged, not dropped
    assert verdict(rs, "203.0.113.9", 5432) == "drop"  # the enforced rule drops other sources
    assert verdict(rs, "10.1.0.2", 5432) == "accept"
    assert verdict(rs, "10.1.0.2", MESH) == "accept"
    assert [r.log_prefix for r in rs.rules if r.verdict == "log"] == ["pm-log default "]


def test_log_prefixes_fit_iptables_and_ports_fit_multiport(sample: Sample) -> None:
    R = sample.doc.allow[0].__class__
    long_name = "x" * 64
    ports = tuple(f"tcp/{p}" for p in range(1000, 1100, 3))
    doc = PolicyDocument(allow=(R(name=long_name, sources=("role:app",), to=("role:db",), ports=ports, mode="log"),))
    rs = render(sample.policy(doc=doc), sample.a, sample.members, OPTS)
    prefixes = [r.log_prefix for r in rs.rules if r.log_prefix]
    assert prefixes and all(p is not None and len(p) <= MAX_LOG_PREFIX for p in prefixes)
    ipt = to_iptables(rs)
    for line in ipt.ipv4.splitlines():
        if "--dports" in line:
            spec = line.split("--dports ")[1].split()[0]
            assert sum(2 if ":" in p else 1 for p in spec.split(",")) <= MULTIPORT_SLOTS
    assert ipt.ipv4.count("-m multiport") >= 2 * len(ports) // MULTIPORT_SLOTS


def test_option_validation() -> None:
    for bad in ({"mesh_port": 0}, {"mesh_port": MESH, "table": "Bad-Name"}, {"mesh_port": MESH, "log_rate": "5/s"},
                {"mesh_port": MESH, "admin_port": MESH}, {"mesh_port": MESH, "table": "x" * 17}):
        with pytest.raises(EnforcementError):
            RenderOptions(**bad)  # type: ignore[arg-type]


def test_ruleset_rejects_dangling_set_references() -> None:
    from meshnode.enforce import FilterRule

    with pytest.raises(EnforcementError, match="unknown set"):
        Ruleset(table="policymesh", sets=(), rules=(FilterRule("accept", source_set="nope"),))


def _fields(cert: Certificate) -> dict[str, object]:
    return {f: getattr(cert, f) for f in cert.__struct_fields__}
