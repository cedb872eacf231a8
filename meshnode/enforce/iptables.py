"""iptables serialisation of a :class:`Ruleset`: ipset sets + one chain per family.

Only our own objects are touched:

* ipsets named ``<table>-<generation>-<digest>`` (ipset names are at most 31 characters, so the
  logical set name is hashed; the mapping is printed as comments).  A full apply loads the next
  generation, switches the chain to it, then destroys the old one, so a failed apply leaves the old
  sets and rules in place.
* the chain ``<table>-input`` in the ``filter`` table, loaded with ``iptables-restore --noflush`` (declaring
  the chain replaces its rules atomically and leaves every other chain alone), hooked from ``INPUT`` by
  one jump in first position.

Our chain never ACCEPTs: an allowed packet RETURNs to ``INPUT`` so the host's other rules still see it,
exactly like an ``accept`` in our own nftables base chain.  Drops are final in both.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from .model import AddressSet, EnforcementError, FilterRule, Ruleset

MULTIPORT_SLOTS = 15
MIN_MAXELEM = 65536
ICMP6_NAMES = {
    "destination-unreachable": "destination-unreachable",
    "packet-too-big": "packet-too-big",
    "time-exceeded": "time-exceeded",
    "parameter-problem": "parameter-problem",
    "nd-router-solicit": "router-solicitation",
    "nd-router-advert": "router-advertisement",
    "nd-neighbor-solicit": "neighbour-solicitation",
    "nd-neighbor-advert": "neighbour-advertisement",
    "mld-listener-query": "130",
    "mld-listener-report": "131",
    "mld-listener-done": "132",
    "mld2-listener-report": "143",
    "echo-request": "echo-request",
}


def chain_name(table: str) -> str:
    return f"{table}-input"


def ipset_prefix(table: str, generation: str) -> str:
    return f"{table}-{generation}-"


def ipset_name(table: str, generation: str, logical: str) -> str:
    return ipset_prefix(table, generation) + hashlib.sha256(logical.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class IptablesRules:
    """Inputs for ``ipset restore``, ``iptables-restore --noflush`` and ``ip6tables-restore --noflush``."""

    table: str
    generation: str
    chain: str
    set_names: dict[str, str]  # logical name -> ipset name
    ipset: str
    ipv4: str
    ipv6: str

    def text(self) -> str:
        parts = [f"# policymesh iptables rendering (generation {self.generation})"]
        parts += [f"# ipset {v} = {k}" for k, v in sorted(self.set_names.items())]
        parts += ["# --- ipset restore", self.ipset.rstrip(), "# --- iptables-restore --noflush", self.ipv4.rstrip(),
                  "# --- ip6tables-restore --noflush", self.ipv6.rstrip(), f"# hook: -I INPUT 1 -j {self.chain}"]
        return "\n".join(parts) + "\n"


def ipset_elements(s: AddressSet) -> list[str]:
    """ipset hash:net cannot hold a /0: split it in two halves."""
    out: list[str] = []
    for e in s.elements:
        if s.interval and e in ("0.0.0.0/0", "::/0"):
            out += [str(n) for n in ipaddress.ip_network(e).subnets(prefixlen_diff=1)]
        else:
            out.append(e)
    return out


def ipset_create_line(name: str, s: AddressSet, count: int) -> str:
    kind = "hash:net" if s.interval else "hash:ip"
    family = "inet" if s.family == "ip" else "inet6"
    maxelem = MIN_MAXELEM
    while maxelem < 2 * count:
        maxelem *= 2
    return f"create {name} {kind} family {family} hashsize 1024 maxelem {maxelem}"


def ipset_fill(name: str, s: AddressSet) -> list[str]:
    elems = ipset_elements(s)
    return [ipset_create_line(name, s, len(elems))] + [f"add {name} {e}" for e in elems]


def _port_chunks(ports: tuple[tuple[int, int], ...]) -> list[list[tuple[int, int]]]:
    chunks: list[list[tuple[int, int]]] = [[]]
    used = 0
    for lo, hi in ports:
        cost = 1 if lo == hi else 2
        if used + cost > MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append((lo, hi))
        used += cost
    return chunks


def _port_match(chunk: list[tuple[int, int]]) -> str:
    if len(chunk) == 1:
        lo, hi = chunk[0]
        return f"--dport {lo}" if lo == hi else f"--dport {lo}:{hi}"
    return "-m multiport --dports " + ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in chunk)


def _rule_lines(rs: Ruleset, r: FilterRule, fam: str, chain: str, names: dict[str, str]) -> list[str]:
    rule_fam = rs.rule_family(r)
    if rule_fam is not None and rule_fam != fam:
        return []
    head = [f"-A {chain}"]
    if r.iif is not None:
        head.append(f"-i {r.iif}")
    if r.ct_state:
        head.append("-m conntrack --ctstate " + ",".join(s.upper() for s in r.ct_state))
    if r.source_set is not None:
        head.append(f"-m set --match-set {names[r.source_set]} src")
    variants: list[str] = []
    icmp = "icmp" if fam == "ip" else "ipv6-icmp"
    if r.icmp_types:
        for t in r.icmp_types:
            variants.append(f"-p icmp --icmp-type {t}" if fam == "ip" else f"-p ipv6-icmp --icmpv6-type {ICMP6_NAMES.get(t, t)}")
    elif r.proto in ("tcp", "udp"):
        if r.ports:
            variants += [f"-p {r.proto} {_port_match(c)}" for c in _port_chunks(r.ports)]
        else:
            variants.append(f"-p {r.proto}")
    elif r.proto == "icmp":
        variants.append(f"-p {icmp}")
    else:
        variants.append("")
    tail: list[str] = []
    if r.comment:
        tail.append(f'-m comment --comment "{r.comment}"')
    if r.limit is not None:
        tail.append(f"-m limit --limit {r.limit} --limit-burst 5")
    if r.verdict == "accept":
        tail.append("-j RETURN")
    elif r.verdict == "drop":
        tail.append("-j DROP")
    elif r.verdict == "log":
        tail.append(f'-j LOG --log-prefix "{r.log_prefix or ""}"')
    elif r.proto == "tcp":
        tail.append("-j REJECT --reject-with tcp-reset")
    else:
        tail.append("-j REJECT --reject-with " + ("icmp-admin-prohibited" if fam == "ip" else "icmp6-adm-prohibited"))
    return [" ".join(x for x in [*head, v, *tail] if x) for v in variants]


def restore_text(chain: str, rule_lines: list[str]) -> str:
    """``iptables-restore --noflush`` input that declares ``chain`` (replacing its rules) with ``rule_lines``."""
    return "\n".join(["*filter", f":{chain} - [0:0]", *rule_lines, "COMMIT", ""])


def restore_input(rs: Ruleset, fam: str, chain: str, names: dict[str, str]) -> str:
    lines: list[str] = []
    for r in rs.rules:
        lines += _rule_lines(rs, r, fam, chain, names)
    # the chain's own "policy": anything that falls through is dropped
    lines.append(f'-A {chain} -m comment --comment "policy drop" -j DROP')
    return restore_text(chain, lines)


def ipset_names(rs: Ruleset, generation: str) -> dict[str, str]:
    """Logical set name -> ipset name of ``generation``."""
    return {s.name: ipset_name(rs.table, generation, s.name) for s in rs.sets}


def to_iptables(rs: Ruleset, generation: str = "a") -> IptablesRules:
    """The inputs that load ``rs`` as ipsets of ``generation`` and the two chains that match them."""
    if any(s.timeout for s in rs.sets):
        raise EnforcementError("the abuse block sets ([validate] block_abusers_s) need the nftables backend")
    chain = chain_name(rs.table)
    names = ipset_names(rs, generation)
    ipset_lines: list[str] = []
    for s in rs.sets:
        ipset_lines += ipset_fill(names[s.name], s)
    return IptablesRules(
        table=rs.table,
        generation=generation,
        chain=chain,
        set_names=names,
        ipset="\n".join(ipset_lines) + "\n",
        ipv4=restore_input(rs, "ip", chain, names),
        ipv6=restore_input(rs, "ip6", chain, names),
    )
