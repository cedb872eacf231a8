"""Property tests: for any policy, membership and options, the rendered ruleset keeps a dropping
default and the mesh interlock, and its semantics equal an independent reading of the policy."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.enforce import Packet, RenderOptions, render, to_nft_json, to_nft_text
from protocol.trust import Certificate
from protocol.trust.policy import Defaults, PolicyDocument, Revocations, Rule, parse_port, validate_document
from simulations.identities import T0

MESH = 7946
ROLES = ["app", "db", "web", "monitor"]
NODES = [f"n{i}" for i in range(6)]
V4 = [f"10.0.0.{i}" for i in range(1, 13)]
V6 = [f"fd00::{i:x}" for i in range(1, 13)]
OUTSIDERS = ["198.51.100.7", "2001:db8:ffff::7"]
SOURCES = ["role:app", "role:db", "role:web", "role:monitor", "role:*", "node:n1", "node:n2", "node:n9",
           "cidr:10.0.0.0/30", "cidr:192.0.2.0/24", "cidr:fd00::/126", "cidr:10.0.0.8/29"]
TARGETS = ["role:app", "role:db", "role:web", "role:*", "node:n0", "node:n1"]
PORTS = ["tcp/22", "tcp/5432", "tcp/9000-9010", "tcp/9005", "udp/53", "icmp", f"tcp/{MESH}"]
PROBES = [("tcp", 22), ("tcp", 5432), ("tcp", 9005), ("tcp", 9011), ("udp", 53), ("tcp", 53), ("icmp", None),
          ("tcp", MESH), ("udp", MESH)]


@st.composite
def certificates(draw: st.DrawFn) -> list[Certificate]:
    certs = []
    for i, node in enumerate(NODES):
        if i > 0 and not draw(st.booleans()):
            continue
        roles = draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True))
        addrs = draw(st.lists(st.sampled_from([V4[2 * i], V4[2 * i + 1], V6[2 * i], V6[2 * i + 1]]),
                              min_size=0 if i else 1, max_size=4, unique=True))
        certs.append(Certificate(cluster="test", node_id=node, region="r1", roles=tuple(sorted(roles)),
                                 addresses=tuple(addrs), identity_key=bytes(32), static_key=bytes(32),
                                 not_before=0, not_after=T0 * 2, cert_id=f"cert-{node}"))
    return certs


@st.composite
def documents(draw: st.DrawFn) -> PolicyDocument:
    rules = []
    for i in range(draw(st.integers(0, 5))):
        rules.append(Rule(
            name=f"r{i}",
            sources=tuple(draw(st.lists(st.sampled_from(SOURCES), min_size=1, max_size=4, unique=True))),
            to=tuple(draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2, unique=True))),
            ports=tuple(draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))),
            mode=draw(st.sampled_from([None, "enforce", "log"])),
        ))
    defaults = Defaults(inbound=draw(st.sampled_from(["drop", "reject"])), mode=draw(st.sampled_from(["enforce", "log"])))
    return validate_document(PolicyDocument(defaults=defaults, allow=tuple(rules)))


options = st.builds(
    RenderOptions,
    mesh_port=st.just(MESH),
    icmp_essential=st.booleans(),
    break_glass_cidrs=st.sampled_from([(), ("192.0.2.128/25",), ("10.0.0.12/32", "fd00::c/128")]),
    default_inbound=st.sampled_from([None, "drop", "reject"]),
)


def port_matches(rule: Rule, proto: str, port: int | None) -> bool:
    for p in rule.ports:
        spec = parse_port(p)
        if spec.proto == proto and (proto == "icmp" or (port is not None and spec.lo <= port <= spec.hi)):
            return True
    return False


def oracle(doc: PolicyDocument, own: Certificate, valid: list[Certificate], opts: RenderOptions,
           src: str, proto: str, port: int | None) -> str:
    """The policy read straight from DESIGN.md, without sets or rule grouping."""
    addr = ipaddress.ip_address(src)
    inbound = opts.default_inbound or doc.defaults.inbound
    if any(addr in ipaddress.ip_network(c) for c in opts.break_glass_cidrs):
        return "accept"
    member_addrs = {a for c in valid for a in c.addresses}
    if proto in ("tcp", "udp") and port == MESH and src in member_addrs:  # stream and datagrams
        return "accept"

    def targets_me(rule: Rule) -> bool:
        return any(t == "role:*" or t == f"node:{own.node_id}" or (t.startswith("role:") and t[5:] in own.roles)
                   for t in rule.to)

    def source_ok(rule: Rule) -> bool:
        for s in rule.sources:
            kind, _, value = s.partition(":")
            if kind == "cidr" and addr in ipaddress.ip_network(value):
                return True
            for c in valid:
                if src not in c.addresses:
                    continue
                if (kind == "role" and (value == "*" or value in c.roles)) or (kind == "node" and value == c.node_id):
                    return True
        return False

    matched = [r for r in doc.allow if targets_me(r)]
    for r in matched:
        if port_matches(r, proto, port) and source_ok(r):
            return "accept"
    for r in matched:
        if r.mode is not None and r.mode != doc.defaults.mode and port_matches(r, proto, port):
            return "accept" if r.mode == "log" else inbound
    return "accept" if doc.defaults.mode == "log" else inbound


@settings(max_examples=300, deadline=None)
@given(doc=documents(), certs=certificates(), opts=options,
       revoked=st.lists(st.sampled_from(NODES[1:]), max_size=3, unique=True))
def test_every_ruleset_keeps_default_drop_and_the_mesh_interlock(
    doc: PolicyDocument, certs: list[Certificate], opts: RenderOptions, revoked: list[str]
) -> None:
    from protocol.trust import build_policy

    own, members = certs[0], certs[1:]
    pv = build_policy("test", 1, T0, T0 + 100, 1, doc, Revocations(nodes=tuple(revoked)))
    rs = render(pv, own, members, opts, now=T0)
    valid = [c for c in certs if c.node_id not in revoked]

    # structure: the base chain's own policy is drop, whatever the policy says
    chain = [e["add"]["chain"] for e in to_nft_json(rs)["nftables"] if "chain" in e.get("add", {})]
    assert chain == [{"family": "inet", "table": "policymesh", "name": "input", "type": "filter", "hook": "input",
                      "prio": 0, "policy": "drop"}]
    assert "policy drop;" in to_nft_text(rs)
    # no unconditional accept, except the explicit log-mode default (a signed policy's choice)
    uncond = [r for r in rs.rules if r.verdict == "accept" and r.is_unconditional()]
    assert uncond == ([rs.rules[-1]] if doc.defaults.mode == "log" else [])

    # the mesh interlock: every valid member reaches the mesh port, for every policy
    for c in valid:
        for a in c.addresses:
            assert rs.evaluate(Packet(a, "tcp", MESH)) == "accept", (c.node_id, a)
            assert rs.evaluate(Packet(a, "udp", MESH)) == "accept", (c.node_id, a)
    # revoked members are in no membership-derived set (CIDR and break-glass sets are the operator's)
    revoked_addrs = {a for c in certs if c.node_id in revoked for a in c.addresses}
    assert not revoked_addrs & {e for s in rs.sets if not s.interval for e in s.elements}

    # default drop: outsiders get nothing unless the policy is in log mode
    enforcing = doc.defaults.mode == "enforce"
    for src in OUTSIDERS:
        for proto, port in PROBES:
            got = rs.evaluate(Packet(src, proto, port, icmp_type="echo-request" if proto == "icmp" else None))
            if enforcing and not any(r.mode == "log" for r in doc.allow):
                assert got in ("drop", "reject"), (src, proto, port)
            assert got == oracle(doc, own, valid, opts, src, proto, port), (src, proto, port)

    # and everyone else gets exactly what the policy says
    for src in [a for c in certs for a in c.addresses]:
        for proto, port in PROBES:
            got = rs.evaluate(Packet(src, proto, port, icmp_type="echo-request" if proto == "icmp" else None))
            assert got == oracle(doc, own, valid, opts, src, proto, port), (src, proto, port)
