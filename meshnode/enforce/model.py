"""The backend-neutral ruleset: named address sets plus one ordered inbound filter chain.

A :class:`Ruleset` is what the renderer produces and what every backend consumes.  It is a plain value
(frozen dataclasses) and imports no serialiser: :mod:`.nft` writes it as nftables text or JSON and
computes its hash (the normalised form the nftables backend compares with the kernel's),
:mod:`.iptables` writes it as ipset + iptables-restore inputs.  ``Ruleset.evaluate()`` is the reference
semantics of the chain (used by the property tests and by anyone who wants to ask "would this packet
pass?" without a kernel).

Chain semantics, identical in every backend:

* rules are evaluated in order; ``accept``, ``drop`` and ``reject`` end the evaluation, ``log`` logs
  (rate-limited) and continues, ``record`` adds (source, destination port) of a TCP/UDP packet to a
  dynamic set and continues (nftables only: the port-scan check reads that set);
* the chain's own policy is always ``drop``: a packet that falls off the end is dropped;
* ``accept`` only means "policymesh does not object": other firewalls on the host still see the packet
  (an nftables base chain accept, or an iptables ``RETURN`` from our chain).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import MeshError
from protocol.trust.names import parse_network

TABLE_RE = re.compile(r"\A[a-z][a-z0-9_]{0,15}\Z", re.ASCII)
LOG_RATE_RE = re.compile(r"\A([1-9][0-9]{0,5})/(second|minute|hour|day)\Z", re.ASCII)
VERDICTS = ("accept", "drop", "reject", "log", "record")
INBOUND_ACTIONS = ("drop", "reject")
# Essential ICMP (RFC 4890 for ICMPv6): errors, path MTU discovery, MLD.  Echo is not essential; a
# policy opens it with the "icmp" port.  IPv6 neighbour discovery is always accepted: without it IPv6
# does not work at all (it is link plumbing, like loopback), so turning ICMP off never cuts IPv6.
ICMP_ESSENTIAL_V4 = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMP_ESSENTIAL_V6 = (
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
)
ICMP_ND_V6 = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")
MAX_LOG_PREFIX = 29  # iptables' LOG limit; nftables allows more, both backends use the same text


class EnforcementError(MeshError):
    """Rendering or applying a ruleset failed; the previously applied ruleset stays in force."""


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Node-local rendering choices (from the node config, not from the signed policy).

    ``default_inbound`` overrides the policy's ``defaults.inbound`` (``drop`` or ``reject``; never
    accept).  ``admin_port`` is never opened (the admin listener is loopback-only); it is recorded so a
    clash with the mesh port is caught.  ``break_glass_cidrs`` come from ``[overrides]`` and are accepted
    on every port.
    """

    mesh_port: int
    table: str = "policymesh"
    admin_port: int | None = None
    icmp_essential: bool = True
    break_glass_cidrs: tuple[str, ...] = ()
    log_rate: str = "5/second"
    # Sources that may open the mesh port besides the known members (new members join from here; the
    # Noise handshake authenticates every connection). Empty: known members only.
    mesh_join_cidrs: tuple[str, ...] = ()
    default_inbound: str | None = None
    # Record the (source, destination port) of every TCP/UDP packet the default drops in the dynamic sets
    # ``dropped_v4`` / ``dropped_v6`` (elements expire after this many seconds; 0: not rendered). The
    # port-scan check lists them. nftables only; a policy in log mode drops nothing and records nothing.
    port_scan_window_s: int = 0
    # Render the dynamic abuse block sets (``abusers_v4`` / ``abusers_v6``, elements added at run time
    # with a timeout) and the rule that drops their sources; off: the ruleset is exactly as before.
    abuse_block: bool = False

    def __post_init__(self) -> None:
        if not TABLE_RE.fullmatch(self.table):
            raise EnforcementError(
                f"table name {self.table!r}: lower-case letters, digits and '_', starting with a letter, at most 16"
            )
        if not isinstance(self.mesh_port, int) or not 1 <= self.mesh_port <= 65535:
            raise EnforcementError(f"mesh port {self.mesh_port!r} is not 1-65535")
        if self.admin_port is not None:
            if not 1 <= self.admin_port <= 65535:
                raise EnforcementError(f"admin port {self.admin_port!r} is not 1-65535")
            if self.admin_port == self.mesh_port:
                raise EnforcementError("the admin port must differ from the mesh port (admin stays on loopback)")
        if not LOG_RATE_RE.fullmatch(self.log_rate):
            raise EnforcementError(f"log rate {self.log_rate!r} is not N/second, N/minute, N/hour or N/day")
        if not 0 <= self.port_scan_window_s <= 86400:
            raise EnforcementError(f"port scan window {self.port_scan_window_s!r} is not 0..86400 seconds")
        if self.default_inbound is not None and self.default_inbound not in INBOUND_ACTIONS:
            raise EnforcementError(
                f"default inbound action {self.default_inbound!r}: one of {', '.join(INBOUND_ACTIONS)}"
                " (an allow-all default is never accepted)"
            )
        object.__setattr__(self, "break_glass_cidrs", _canonical_cidrs("break-glass", self.break_glass_cidrs))
        object.__setattr__(self, "mesh_join_cidrs", _canonical_cidrs("mesh join", self.mesh_join_cidrs))


def _canonical_cidrs(what: str, cidrs: Iterable[str]) -> tuple[str, ...]:
    out = []
    for c in cidrs:
        try:
            out.append(str(parse_network(c, strict=True)))
        except ValueError as exc:
            raise EnforcementError(f"{what} CIDR {c!r}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class AddressSet:
    """A named set of source addresses of one family.  ``interval`` sets hold prefixes (CIDR sources,
    break-glass); the others hold host addresses from certificates.  Elements are canonical and sorted.
    A ``timeout`` set is dynamic: rendered empty, filled at run time with elements that expire, and its
    elements are not part of the ruleset's hash (they are not drift). A ``with_port`` set's elements are
    (address, port) pairs (``ipv4_addr . inet_service``), added by a ``record`` rule; it has a default
    ``timeout_s`` for its elements and at most ``size`` of them."""

    name: str
    family: str
    interval: bool
    elements: tuple[str, ...]
    purpose: str = ""
    timeout: bool = False
    with_port: bool = False
    timeout_s: int | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class FilterRule:
    """One rule of the inbound chain; every field that is set must match (logical AND).

    ``proto`` is tcp, udp or icmp (icmp means ICMP for IPv4 and ICMPv6 for IPv6); ``ports`` are
    destination port ranges (tcp/udp only); ``icmp_types`` need a ``family``.  A ``source_set`` implies
    the family of that set.  ``log`` rules log with ``log_prefix`` at most ``limit`` per period and
    continue; the other verdicts are final.
    """

    verdict: str
    comment: str = ""
    family: str | None = None
    iif: str | None = None
    ct_state: tuple[str, ...] = ()
    source_set: str | None = None
    proto: str | None = None
    ports: tuple[tuple[int, int], ...] = ()
    icmp_types: tuple[str, ...] = ()
    limit: str | None = None
    log_prefix: str | None = None
    record_set: str | None = None  # ``record``: the (address . port) set that gets (saddr, dport)

    def is_unconditional(self) -> bool:
        return not (self.family or self.iif or self.ct_state or self.source_set or self.proto)


@dataclass(frozen=True, slots=True)
class Packet:
    """A first packet as the chain sees it (for :meth:`Ruleset.evaluate`)."""

    src: str
    proto: str = "tcp"
    dport: int | None = None
    iif: str = "eth0"
    ct_state: str = "new"
    icmp_type: str | None = None


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A member certificate that was given but contributes no address, and why."""

    node_id: str
    cert_id: str
    reason: str


@dataclass(frozen=True)
class Ruleset:
    """This node's inbound filter: named address sets and the ordered chain that refers to them.

    ``node_id``, ``policy_serial`` and ``excluded`` describe where it came from (printed as comments,
    ``excluded`` not compared); ``default_action`` is what the chain's last rule does (drop, reject, or
    log for a policy in log mode).
    """

    table: str
    sets: tuple[AddressSet, ...]
    rules: tuple[FilterRule, ...]
    node_id: str = ""
    policy_serial: int | None = None
    default_action: str = "drop"
    excluded: tuple[Exclusion, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets]
        if len(names) != len(set(names)):
            raise EnforcementError("duplicate set name in ruleset")
        known = {s.name: s for s in self.sets}
        for r in self.rules:
            if r.verdict not in VERDICTS:
                raise EnforcementError(f"unknown verdict {r.verdict!r}")
            if r.source_set is not None and r.source_set not in known:
                raise EnforcementError(f"rule refers to unknown set {r.source_set!r}")
            if r.source_set is not None and r.family is not None and known[r.source_set].family != r.family:
                raise EnforcementError(f"rule family {r.family} does not match set {r.source_set!r}")
            if (r.verdict == "record") != (r.record_set is not None):
                raise EnforcementError("a record rule needs a record set, and only a record rule has one")
            if r.record_set is not None and (r.record_set not in known or not known[r.record_set].with_port):
                raise EnforcementError(f"record rule refers to {r.record_set!r}, not an address . port set")

    # -- views --------------------------------------------------------------------------------------
    def set_by_name(self, name: str) -> AddressSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def rule_count(self) -> int:
        return len(self.rules)

    @property
    def element_count(self) -> int:
        return sum(len(s.elements) for s in self.sets)

    def rule_family(self, rule: FilterRule) -> str | None:
        if rule.source_set is not None:
            return self.set_by_name(rule.source_set).family
        return rule.family

    # -- reference semantics ------------------------------------------------------------------------
    def evaluate(self, pkt: Packet) -> str:
        """Final verdict (accept, drop or reject) of the chain for ``pkt``; ``log`` and ``record`` rules
        are skipped."""
        src = ipaddress.ip_address(pkt.src)
        fam = "ip" if src.version == 4 else "ip6"
        for r in self.rules:
            if r.verdict in ("log", "record") or not _matches(self, r, pkt, src, fam):
                continue
            return r.verdict
        return "drop"

    def verdicts(self, src: str, proto: str, ports: Iterable[int]) -> dict[int, str]:
        """:meth:`evaluate` of a new ``proto`` connection from ``src`` to each of ``ports``, with each rule's
        source set looked up once (not once per port)."""
        addr = ipaddress.ip_address(src)
        fam = "ip" if addr.version == 4 else "ip6"
        probe = Packet(src=src, proto=proto)
        relevant = [r for r in self.rules
                    if r.verdict != "log" and _matches(self, dataclasses.replace(r, ports=()), probe, addr, fam)]
        return {port: next((r.verdict for r in relevant
                            if not r.ports or any(lo <= port <= hi for lo, hi in r.ports)), "drop")
                for port in ports}


def _matches(rs: Ruleset, r: FilterRule, pkt: Packet, src: Any, fam: str) -> bool:
    if r.family is not None and r.family != fam:
        return False
    if r.iif is not None and r.iif != pkt.iif:
        return False
    if r.ct_state and pkt.ct_state not in r.ct_state:
        return False
    if r.source_set is not None:
        s = rs.set_by_name(r.source_set)
        if s.family != fam or not _in_set(s, src):
            return False
    if r.proto is not None and r.proto != pkt.proto:
        return False
    if r.ports:
        if pkt.dport is None or not any(lo <= pkt.dport <= hi for lo, hi in r.ports):
            return False
    if r.icmp_types:
        if r.family != fam or pkt.proto != "icmp" or pkt.icmp_type not in r.icmp_types:
            return False
    return True


def _in_set(s: AddressSet, addr: Any) -> bool:
    if s.interval:
        return any(addr in ipaddress.ip_network(e) for e in s.elements)
    return str(addr) in s.elements
