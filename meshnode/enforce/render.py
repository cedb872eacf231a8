"""Policy + own certificate + member certificates -> this node's :class:`Ruleset`.

:func:`render` checks the policy (:func:`_checked_policy`), collects the addresses of the valid members
(:func:`.members.admit_members`), then a :class:`_ChainBuilder` appends the chain in eight steps, one
method each, creating the named sets the rules refer to as it goes:

1. ``add_prologue``: ``ct state established,related`` accept; ``ct state invalid`` drop; ``iif lo``
   accept; with ``abuse_block``, drop sources in the dynamic ``abusers_v4`` / ``abusers_v6`` timeout
   sets (the daemon adds abusive handshake sources there, never members or break-glass sources);
2. ``add_break_glass``: break-glass CIDRs from the node's ``[overrides]`` (every port);
3. ``add_mesh_interlock``: the mesh port from every valid member (``members_v4`` / ``members_v6``), so
   no policy can cut the mesh itself; then from the mesh join sources;
4. ``add_icmp``: IPv6 neighbour discovery (always), essential ICMP / ICMPv6 (errors, PMTU, MLD) unless
   disabled;
5. ``add_policy_allows``: one accept per (policy rule whose ``to`` matches this node, source set,
   protocol); sources are named sets per role / node / rule-CIDRs and per family, so the rule count
   depends on the policy only;
6. ``add_mode_exceptions``: a ``log`` rule in an enforcing policy logs and accepts other sources on its
   ports (log-then-drop rollout of that rule); an ``enforce`` rule in a logging policy drops them;
7. ``add_port_scan_record``: with ``port_scan_window_s``, record (source, destination port) of every
   TCP/UDP packet that reaches the default in the dynamic ``dropped_v4`` / ``dropped_v6`` timeout sets
   (the port-scan check counts distinct ports per source there; not in log mode, which drops nothing);
8. ``add_default``: drop or reject (``enforce``), or log (rate-limited) and accept (``mode = "log"``).

No policy renders steps 1-4 and a dropping default.  Defence in depth: certificates revoked by the
policy (node id or cert id), of another cluster, or (when ``now`` is given) outside their validity are
left out of every set and listed in ``Ruleset.excluded``; the renderer never checks the policy's own
expiry (fail-static is the caller's decision).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from protocol.errors import PolicyError, RevokedError
from protocol.trust import Certificate, PolicyVersion
from protocol.trust.policy import (
    PolicyDocument,
    Revocations,
    Rule,
    is_canonical,
    parse_port,
    parse_selector,
    validate_document,
    validate_revocations,
)

from .members import MemberAddresses, admit_members
from .model import (
    ICMP_ESSENTIAL_V4,
    ICMP_ESSENTIAL_V6,
    ICMP_ND_V6,
    MAX_LOG_PREFIX,
    AddressSet,
    EnforcementError,
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


def _checked_policy(policy: PolicyVersion | None, own: Certificate) -> tuple[PolicyDocument, Revocations]:
    """The policy's validated document and revocations (empty for no policy); refuses an invalid document
    and a policy that revokes this node itself."""
    if policy is not None:
        try:
            # A verified policy's document is canonical already (decode_policy checked it): the fast
            # check, which never accepts what validate_document rejects, spares re-validating it per apply.
            doc = policy.document if is_canonical(policy.document) else validate_document(policy.document)
            rev = validate_revocations(policy.revocations)
        except PolicyError as exc:
            raise EnforcementError(f"policy serial {policy.serial} is invalid, not rendered: {exc}") from None
    else:
        doc, rev = PolicyDocument(), Revocations()
    if own.node_id in rev.nodes or own.cert_id in rev.certs:
        raise RevokedError(f"this node ({own.node_id}, certificate {own.cert_id}) is revoked by policy serial "
                           f"{policy.serial if policy else '-'}")
    return doc, rev


def _split_families(cidrs: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ip": [], "ip6": []}
    for c in cidrs:
        out["ip" if ipaddress.ip_network(c).version == 4 else "ip6"].append(c)
    return out


class _ChainBuilder:
    """Builds the chain step by step (one method per step of the module docstring, called in that
    order) and the named sets its rules refer to."""

    def __init__(self, options: RenderOptions, addresses: MemberAddresses) -> None:
        self.options = options
        self.addresses = addresses
        self.sets: dict[str, AddressSet] = {}
        self.rules: list[FilterRule] = []
        self.mesh_ports = ((options.mesh_port, options.mesh_port),)

    # -- named sets ---------------------------------------------------------------------------------
    def host_set(self, name: str, fam: str, elements: Iterable[str], purpose: str) -> str:
        """The set ``<name>_v4|v6`` of member addresses (built on first use; its name for the rules)."""
        full = f"{name}_{FAMILY_SUFFIX[fam]}"
        if full not in self.sets:
            ordered = tuple(sorted(set(elements), key=self.addresses.sort_key.__getitem__))
            self.sets[full] = AddressSet(full, fam, False, ordered, purpose)
        return full

    def net_set(self, name: str, fam: str, cidrs: Iterable[str], purpose: str) -> str:
        """The interval set ``<name>_v4|v6`` of ``cidrs`` (collapsed; host prefixes as addresses)."""
        full = f"{name}_{FAMILY_SUFFIX[fam]}"
        nets: list[Any] = list(ipaddress.collapse_addresses(ipaddress.ip_network(c) for c in cidrs))  # type: ignore[type-var]
        elements = tuple(str(n) if n.prefixlen < n.max_prefixlen else str(n.network_address) for n in nets)
        self.sets[full] = AddressSet(full, fam, True, elements, purpose)
        return full

    def dynamic_set(self, name: str, fam: str, purpose: str, *, with_port: bool = False,
                    timeout_s: int | None = None, size: int | None = None) -> str:
        """The empty timeout set ``<name>_v4|v6``, filled at run time."""
        full = f"{name}_{FAMILY_SUFFIX[fam]}"
        self.sets[full] = AddressSet(full, fam, False, (), purpose, timeout=True, with_port=with_port,
                                     timeout_s=timeout_s, size=size)
        return full

    def members_set(self, fam: str) -> str:
        return self.host_set(MEMBERS, fam, self.addresses.all[fam], "every valid member (mesh interlock)")

    def source_sets(self, rule: Rule) -> list[str]:
        """The sets of a rule's sources: per role or node and family, then its CIDRs per family."""
        sources: list[str] = []
        cidrs: list[str] = []
        for sel in rule.sources:
            kind, value = parse_selector(sel, allow_cidr=True)
            if kind == "cidr":
                cidrs.append(value)
                continue
            for fam in ("ip", "ip6"):
                if kind == "role" and value == "*":
                    sources.append(self.members_set(fam))
                elif kind == "role":
                    sources.append(self.host_set(f"role_{value}", fam, self.addresses.by_role[fam].get(value, ()),
                                                 f"members with role {value}"))
                else:
                    sources.append(self.host_set(f"node_{value}", fam, self.addresses.by_node[fam].get(value, ()),
                                                 f"node {value}"))
        for fam, fam_cidrs in _split_families(cidrs).items():
            if fam_cidrs:
                sources.append(self.net_set(f"cidr_{rule.name}", fam, fam_cidrs, f"cidr sources of rule {rule.name}"))
        return sources

    # -- the steps ----------------------------------------------------------------------------------
    def add_prologue(self) -> None:
        """Step 1: established/related, invalid, loopback; the abuse block."""
        self.rules += [
            FilterRule("accept", "established", ct_state=("established", "related")),
            FilterRule("drop", "invalid", ct_state=("invalid",)),
            FilterRule("accept", "loopback", iif="lo"),
        ]
        if self.options.abuse_block:
            for fam in ("ip", "ip6"):
                name = self.dynamic_set(ABUSERS, fam, "handshake abusers, blocked for a while")
                self.rules.append(FilterRule("drop", "abuse block", source_set=name))

    def add_break_glass(self) -> None:
        """Step 2: the node's break-glass CIDRs, every port."""
        for fam, glass in _split_families(self.options.break_glass_cidrs).items():
            if glass:
                name = self.net_set("breakglass", fam, glass, "break-glass override (node config)")
                self.rules.append(FilterRule("accept", "break-glass override", source_set=name))

    def add_mesh_interlock(self) -> None:
        """Step 3: the mesh port from every member (streams and datagrams), then from the join sources."""
        for fam in ("ip", "ip6"):
            self.rules.append(FilterRule("accept", "mesh interlock", source_set=self.members_set(fam), proto="tcp",
                                         ports=self.mesh_ports))
            # Encrypted gossip datagrams on the same port, from members only (a joiner uses the stream).
            self.rules.append(FilterRule("accept", "mesh interlock (datagrams)", source_set=self.members_set(fam),
                                         proto="udp", ports=self.mesh_ports))
        join = _split_families(self.options.mesh_join_cidrs)
        if any(ipaddress.ip_network(c).prefixlen == 0 for c in join["ip"]) and \
                any(ipaddress.ip_network(c).prefixlen == 0 for c in join["ip6"]):
            self.rules.append(FilterRule("accept", "mesh join (authenticated by noise)", proto="tcp",
                                         ports=self.mesh_ports))
            return
        for fam, join_cidrs in join.items():
            if join_cidrs:
                name = self.net_set("meshjoin", fam, join_cidrs, "mesh join sources (node config)")
                self.rules.append(FilterRule("accept", "mesh join (authenticated by noise)", source_set=name,
                                             proto="tcp", ports=self.mesh_ports))

    def add_icmp(self) -> None:
        """Step 4: IPv6 neighbour discovery always, essential ICMP / ICMPv6 unless disabled."""
        self.rules.append(FilterRule("accept", "ipv6 neighbour discovery", family="ip6", proto="icmp",
                                     icmp_types=ICMP_ND_V6))
        if self.options.icmp_essential:
            self.rules.append(FilterRule("accept", "essential icmp", family="ip", proto="icmp",
                                         icmp_types=ICMP_ESSENTIAL_V4))
            self.rules.append(FilterRule("accept", "essential icmpv6", family="ip6", proto="icmp",
                                         icmp_types=ICMP_ESSENTIAL_V6))

    def add_policy_allows(self, matched: list[Rule]) -> None:
        """Step 5: one accept per (rule, source set, protocol)."""
        for rule in matched:
            for src in self.source_sets(rule):
                for proto, ranges in _port_groups(rule):
                    self.rules.append(FilterRule("accept", f"allow {rule.name}", source_set=src, proto=proto,
                                                 ports=ranges))

    def add_mode_exceptions(self, matched: list[Rule], policy_mode: str, inbound: str) -> None:
        """Step 6: a rule whose mode differs from the policy's logs and accepts, or drops, other sources
        on its ports."""
        for rule in matched:
            if rule.mode is None or rule.mode == policy_mode:
                continue
            for proto, ranges in _port_groups(rule):
                if rule.mode == "log":
                    self.rules.append(FilterRule("log", f"log-only {rule.name}", proto=proto, ports=ranges,
                                                 limit=self.options.log_rate, log_prefix=log_prefix(rule.name)))
                    self.rules.append(FilterRule("accept", f"log-only {rule.name}", proto=proto, ports=ranges))
                else:
                    self.rules.extend(_default_rules(inbound, f"enforced {rule.name}", proto=proto, ports=ranges))

    def add_port_scan_record(self) -> None:
        """Step 7 (enforcing policies only): record what reaches the dropping default."""
        if not self.options.port_scan_window_s:
            return
        for fam in ("ip", "ip6"):
            name = self.dynamic_set(DROPPED, fam, "dropped attempts by source and port (port-scan check)",
                                    with_port=True, timeout_s=self.options.port_scan_window_s, size=DROPPED_SIZE)
            self.rules.append(FilterRule("record", "port scan record", family=fam, record_set=name))

    def add_default(self, policy_mode: str, inbound: str) -> str:
        """Step 8: drop or reject, or in log mode log and accept; returns the default action."""
        if policy_mode == "log":
            self.rules.append(FilterRule("log", "default (log mode)", limit=self.options.log_rate,
                                         log_prefix=log_prefix("default")))
            self.rules.append(FilterRule("accept", "default (log mode)"))
            return "log"
        self.rules.extend(_default_rules(inbound, "default"))
        return inbound


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
    doc, rev = _checked_policy(policy, own)
    addresses, excluded = admit_members(own, members, rev, now=now, skew_s=skew_s)
    mode = doc.defaults.mode
    inbound = options.default_inbound or doc.defaults.inbound
    matched = [r for r in doc.allow if _targets_me(r, own)]
    chain = _ChainBuilder(options, addresses)
    chain.add_prologue()
    chain.add_break_glass()
    chain.add_mesh_interlock()
    chain.add_icmp()
    chain.add_policy_allows(matched)
    chain.add_mode_exceptions(matched, mode, inbound)
    if mode != "log":
        chain.add_port_scan_record()
    default_action = chain.add_default(mode, inbound)
    return Ruleset(
        table=options.table,
        sets=tuple(sorted(chain.sets.values(), key=lambda s: s.name)),
        rules=tuple(chain.rules),
        node_id=own.node_id,
        policy_serial=policy.serial if policy else None,
        default_action=default_action,
        excluded=tuple(excluded),
    )


def _default_rules(action: str, comment: str, proto: str | None = None,
                   ports: tuple[tuple[int, int], ...] = ()) -> list[FilterRule]:
    """The rules that refuse what reaches them with ``action`` (drop, or reject: a TCP reset for TCP)."""
    if action == "drop":
        return [FilterRule("drop", comment, proto=proto, ports=ports)]
    if action == "reject":
        if proto is None:
            return [FilterRule("reject", comment, proto="tcp"), FilterRule("reject", comment)]
        return [FilterRule("reject", comment, proto=proto, ports=ports)]
    raise EnforcementError(f"inbound action {action!r} is not drop or reject")
