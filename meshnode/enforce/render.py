"""Policy + own certificate + member certificates -> this node's :class:`Ruleset`.

The chain, in order:

1. ``ct state established,related`` accept; ``ct state invalid`` drop; ``iif lo`` accept;
   with ``abuse_block``, drop sources in the dynamic ``abusers_v4`` / ``abusers_v6`` timeout sets (the
   daemon adds abusive handshake sources there, never members or break-glass sources);
2. break-glass CIDRs from the node's ``[overrides]`` (every port);
3. the mesh interlock: the mesh port from every valid member (``members_v4`` / ``members_v6``), so no
   policy can cut the mesh itself;
4. IPv6 neighbour discovery (always), essential ICMP / ICMPv6 (errors, PMTU, MLD) unless disabled;
5. one accept per (policy rule whose ``to`` matches this node, source set, protocol); sources are named
   sets per role / node / rule-CIDRs and per family, so the rule count depends on the policy only;
6. per-rule mode exceptions: a ``log`` rule in an enforcing policy logs and accepts other sources on its
   ports (log-then-drop rollout of that rule); an ``enforce`` rule in a logging policy drops them;
7. with ``port_scan_window_s``, record (source, destination port) of every TCP/UDP packet that reaches
   the default in the dynamic ``dropped_v4`` / ``dropped_v6`` timeout sets (the port-scan check counts
   distinct ports per source there; not in log mode, which drops nothing);
8. the default: drop or reject (``enforce``), or log (rate-limited) and accept (``mode = "log"``).

No policy renders steps 1-4 and a dropping default.  Defence in depth: certificates revoked by the
policy (node id or cert id), of another cluster, or (when ``now`` is given) outside their validity are
left out of every set and listed in ``Ruleset.excluded``; the renderer never checks the policy's own
expiry (fail-static is the caller's decision).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from protocol.errors import PolicyError, RevokedError
from protocol.trust import Certificate, PolicyVersion
from protocol.trust.policy import (
    PolicyDocument,
    Revocations,
    Rule,
    parse_port,
    parse_selector,
    validate_document,
    validate_revocations,
)

from .model import (
    ICMP_ESSENTIAL_V4,
    ICMP_ESSENTIAL_V6,
    ICMP_ND_V6,
    MAX_LOG_PREFIX,
    AddressSet,
    EnforcementError,
    Exclusion,
    FilterRule,
    RenderOptions,
    Ruleset,
)

MEMBERS = "members"
ABUSERS = "abusers"  # the dynamic block sets: abusers_v4, abusers_v6
DROPPED = "dropped"  # the dynamic (source . port) sets of the port-scan check: dropped_v4, dropped_v6
DROPPED_SIZE = 65535  # elements per family at most; when full, further attempts are not recorded
FAMILY_SUFFIX = {"ip": "v4", "ip6": "v6"}


def log_prefix(tag: str) -> str:
    """``pm-log <tag> `` cut to the iptables limit, so both backends log the same text."""
    return f"pm-log {tag}"[: MAX_LOG_PREFIX - 1] + " "


class _Directory:
    """Addresses of the valid, unrevoked members, by family, role and node (lists; deduplicated when a
    set is built).  This is the hot loop of a 10,000-member render: inet_pton/inet_ntop inline, and
    no per-address tuples (they would only feed the garbage collector)."""

    def __init__(self) -> None:
        self.all: dict[str, list[str]] = {"ip": [], "ip6": []}
        self.by_role: dict[str, dict[str, list[str]]] = {"ip": {}, "ip6": {}}
        self.by_node: dict[str, dict[str, list[str]]] = {"ip": {}, "ip6": {}}
        self.sort_key: dict[str, bytes] = {}

    def add(self, cert: Certificate) -> list[str]:
        bad = []
        pton, ntop, sort_key = socket.inet_pton, socket.inet_ntop, self.sort_key
        for raw in cert.addresses:
            if "%" in raw:  # scoped link-local: cannot go into a set
                bad.append(raw)
                continue
            if ":" in raw:
                af, fam = socket.AF_INET6, "ip6"
            else:
                af, fam = socket.AF_INET, "ip"
            try:
                packed = pton(af, raw)
            except OSError:
                bad.append(raw)
                continue
            text = ntop(af, packed)
            sort_key[text] = packed
            self.all[fam].append(text)
            by_role = self.by_role[fam]
            for role in cert.roles:
                if role in by_role:
                    by_role[role].append(text)
                else:
                    by_role[role] = [text]
            self.by_node[fam].setdefault(cert.node_id, []).append(text)
        return bad


def _exclusion_reason(cert: Certificate, own: Certificate, revoked_nodes: frozenset[str],
                      revoked_certs: frozenset[str], now: float | None, skew_s: float) -> str | None:
    if cert.cluster != own.cluster:
        return f"cluster {cert.cluster!r} is not {own.cluster!r}"
    if cert.node_id in revoked_nodes:
        return "node revoked"
    if cert.cert_id in revoked_certs:
        return "certificate revoked"
    if now is not None:
        if cert.not_after < now - skew_s:
            return "certificate expired"
        if cert.not_before > now + skew_s:
            return "certificate not yet valid"
    return None


def _targets_me(rule: Rule, own: Certificate) -> bool:
    for sel in rule.to:
        kind, value = parse_selector(sel, allow_cidr=False)
        if kind == "role" and (value == "*" or value in own.roles):
            return True
        if kind == "node" and value == own.node_id:
            return True
    return False


def _merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _port_groups(rule: Rule) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """[(proto, ranges)] in a fixed order: tcp, udp, icmp (no ranges)."""
    by_proto: dict[str, list[tuple[int, int]]] = {"tcp": [], "udp": []}
    icmp = False
    for p in rule.ports:
        spec = parse_port(p)
        if spec.proto == "icmp":
            icmp = True
        else:
            by_proto[spec.proto].append((spec.lo, spec.hi))
    groups: list[tuple[str, tuple[tuple[int, int], ...]]] = [
        (proto, _merge_ranges(r)) for proto, r in by_proto.items() if r
    ]
    if icmp:
        groups.append(("icmp", ()))
    return groups


def _check_document(policy: PolicyVersion) -> tuple[PolicyDocument, Revocations]:
    try:
        doc = validate_document(policy.document)
        rev = validate_revocations(policy.revocations)
    except PolicyError as exc:
        raise EnforcementError(f"policy serial {policy.serial} is invalid, not rendered: {exc}") from None
    return doc, rev


def render(
    policy: PolicyVersion | None,
    own: Certificate,
    members: Iterable[Certificate],
    options: RenderOptions,
    *,
    now: float | None = None,
    skew_s: float = 0,
) -> Ruleset:
    """Render this node's ruleset.  Raises EnforcementError for an invalid policy document and
    RevokedError when the policy revokes this node itself (the caller keeps its last ruleset)."""
    if policy is not None:
        doc, rev = _check_document(policy)
    else:
        doc, rev = PolicyDocument(), Revocations()
    if own.node_id in rev.nodes or own.cert_id in rev.certs:
        raise RevokedError(f"this node ({own.node_id}, certificate {own.cert_id}) is revoked by policy serial "
                           f"{policy.serial if policy else '-'}")

    directory = _Directory()
    excluded: list[Exclusion] = []
    seen: set[str] = set()
    revoked_nodes, revoked_certs = frozenset(rev.nodes), frozenset(rev.certs)
    for cert in [own, *members]:
        key = f"{cert.node_id}\0{cert.cert_id}"
        if key in seen:
            continue
        seen.add(key)
        reason = _exclusion_reason(cert, own, revoked_nodes, revoked_certs, now, skew_s)
        if reason is not None:
            excluded.append(Exclusion(cert.node_id, cert.cert_id, reason))
            continue
        for bad in directory.add(cert):
            excluded.append(Exclusion(cert.node_id, cert.cert_id, f"address {bad!r} skipped"))

    sets: dict[str, AddressSet] = {}

    def host_set(name: str, fam: str, elements: Iterable[str], purpose: str) -> str:
        full = f"{name}_{FAMILY_SUFFIX[fam]}"
        if full not in sets:
            ordered = tuple(sorted(set(elements), key=directory.sort_key.__getitem__))
            sets[full] = AddressSet(full, fam, False, ordered, purpose)
        return full

    def net_set(name: str, fam: str, cidrs: Iterable[str], purpose: str) -> str:
        full = f"{name}_{FAMILY_SUFFIX[fam]}"
        nets: list[Any] = list(ipaddress.collapse_addresses(ipaddress.ip_network(c) for c in cidrs))  # type: ignore[type-var]
        elements = tuple(str(n) if n.prefixlen < n.max_prefixlen else str(n.network_address) for n in nets)
        sets[full] = AddressSet(full, fam, True, elements, purpose)
        return full

    def members_set(fam: str) -> str:
        return host_set(MEMBERS, fam, directory.all[fam], "every valid member (mesh interlock)")

    def split_families(cidrs: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"ip": [], "ip6": []}
        for c in cidrs:
            out["ip" if ipaddress.ip_network(c).version == 4 else "ip6"].append(c)
        return out

    rules: list[FilterRule] = [
        FilterRule("accept", "established", ct_state=("established", "related")),
        FilterRule("drop", "invalid", ct_state=("invalid",)),
        FilterRule("accept", "loopback", iif="lo"),
    ]
    if options.abuse_block:
        for fam in ("ip", "ip6"):
            name = f"{ABUSERS}_{FAMILY_SUFFIX[fam]}"
            sets[name] = AddressSet(name, fam, False, (), "handshake abusers, blocked for a while", timeout=True)
            rules.append(FilterRule("drop", "abuse block", source_set=name))
    for fam, glass in split_families(options.break_glass_cidrs).items():
        if glass:
            name = net_set("breakglass", fam, glass, "break-glass override (node config)")
            rules.append(FilterRule("accept", "break-glass override", source_set=name))
    mesh_ports = ((options.mesh_port, options.mesh_port),)
    for fam in ("ip", "ip6"):
        rules.append(FilterRule("accept", "mesh interlock", source_set=members_set(fam), proto="tcp",
                                ports=mesh_ports))
        # Encrypted gossip datagrams on the same port, from members only (a joiner uses the stream).
        rules.append(FilterRule("accept", "mesh interlock (datagrams)", source_set=members_set(fam), proto="udp",
                                ports=mesh_ports))
    join = split_families(options.mesh_join_cidrs)
    if any(ipaddress.ip_network(c).prefixlen == 0 for c in join["ip"]) and \
            any(ipaddress.ip_network(c).prefixlen == 0 for c in join["ip6"]):
        rules.append(FilterRule("accept", "mesh join (authenticated by noise)", proto="tcp", ports=mesh_ports))
    else:
        for fam, join_cidrs in join.items():
            if join_cidrs:
                name = net_set("meshjoin", fam, join_cidrs, "mesh join sources (node config)")
                rules.append(FilterRule("accept", "mesh join (authenticated by noise)", source_set=name,
                                        proto="tcp", ports=mesh_ports))
    rules.append(FilterRule("accept", "ipv6 neighbour discovery", family="ip6", proto="icmp", icmp_types=ICMP_ND_V6))
    if options.icmp_essential:
        rules.append(FilterRule("accept", "essential icmp", family="ip", proto="icmp", icmp_types=ICMP_ESSENTIAL_V4))
        rules.append(FilterRule("accept", "essential icmpv6", family="ip6", proto="icmp", icmp_types=ICMP_ESSENTIAL_V6))

    inbound = options.default_inbound or doc.defaults.inbound
    matched = [r for r in doc.allow if _targets_me(r, own)]
    for rule in matched:
        sources: list[str] = []
        cidrs: list[str] = []
        for sel in rule.sources:
            kind, value = parse_selector(sel, allow_cidr=True)
            if kind == "cidr":
                cidrs.append(value)
                continue
            for fam in ("ip", "ip6"):
                if kind == "role" and value == "*":
                    sources.append(members_set(fam))
                elif kind == "role":
                    sources.append(host_set(f"role_{value}", fam, directory.by_role[fam].get(value, ()),
                                            f"members with role {value}"))
                else:
                    sources.append(host_set(f"node_{value}", fam, directory.by_node[fam].get(value, ()),
                                            f"node {value}"))
        for fam, fam_cidrs in split_families(cidrs).items():
            if fam_cidrs:
                sources.append(net_set(f"cidr_{rule.name}", fam, fam_cidrs, f"cidr sources of rule {rule.name}"))
        for src in sources:
            for proto, ranges in _port_groups(rule):
                rules.append(FilterRule("accept", f"allow {rule.name}", source_set=src, proto=proto, ports=ranges))

    for rule in matched:
        if rule.mode is None or rule.mode == doc.defaults.mode:
            continue
        for proto, ranges in _port_groups(rule):
            if rule.mode == "log":
                rules.append(FilterRule("log", f"log-only {rule.name}", proto=proto, ports=ranges,
                                        limit=options.log_rate, log_prefix=log_prefix(rule.name)))
                rules.append(FilterRule("accept", f"log-only {rule.name}", proto=proto, ports=ranges))
            else:
                rules.extend(_default_rules(inbound, f"enforced {rule.name}", proto=proto, ports=ranges))

    if doc.defaults.mode == "log":
        rules.append(FilterRule("log", "default (log mode)", limit=options.log_rate, log_prefix=log_prefix("default")))
        rules.append(FilterRule("accept", "default (log mode)"))
        default_action = "log"
    else:
        if options.port_scan_window_s:
            for fam in ("ip", "ip6"):
                name = f"{DROPPED}_{FAMILY_SUFFIX[fam]}"
                sets[name] = AddressSet(name, fam, False, (), "dropped attempts by source and port (port-scan check)",
                                        timeout=True, with_port=True, timeout_s=options.port_scan_window_s,
                                        size=DROPPED_SIZE)
                rules.append(FilterRule("record", "port scan record", family=fam, record_set=name))
        rules.extend(_default_rules(inbound, "default"))
        default_action = inbound

    return Ruleset(
        table=options.table,
        sets=tuple(sorted(sets.values(), key=lambda s: s.name)),
        rules=tuple(rules),
        node_id=own.node_id,
        policy_serial=policy.serial if policy else None,
        default_action=default_action,
        excluded=tuple(excluded),
    )


def _default_rules(action: str, comment: str, proto: str | None = None,
                   ports: tuple[tuple[int, int], ...] = ()) -> list[FilterRule]:
    if action == "drop":
        return [FilterRule("drop", comment, proto=proto, ports=ports)]
    if action == "reject":
        if proto is None:
            return [FilterRule("reject", comment, proto="tcp"), FilterRule("reject", comment)]
        return [FilterRule("reject", comment, proto=proto, ports=ports)]
    raise EnforcementError(f"inbound action {action!r} is not drop or reject")
