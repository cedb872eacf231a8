"""nftables serialisation of a :class:`Ruleset` (its normalisation and hash: :mod:`.nft_digest`).

Both forms are one idempotent transaction that touches only ``table inet <name>``::

    add table inet policymesh          # exists afterwards, whether or not it did before
    delete table inet policymesh       # so this never fails
    table inet policymesh { ... }      # the full definition

nft applies a file as one kernel transaction: either all of it takes effect or none of it does.

"""

from __future__ import annotations

import ipaddress
from typing import Any

from .model import AddressSet, FilterRule, Ruleset

FAMILY = "inet"
CHAIN = "input"
PRIORITY = 0  # "filter"
NFPROTO = {"ip": "ipv4", "ip6": "ipv6"}
ADDR_TYPE = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}
ICMP_PROTO = {"ip": "icmp", "ip6": "ipv6-icmp"}
ICMP_PAYLOAD = {"ip": "icmp", "ip6": "icmpv6"}


# -- text ------------------------------------------------------------------------------------------
def _ports_text(ports: tuple[tuple[int, int], ...]) -> str:
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _record_text(rs: Ruleset, r: FilterRule) -> str:
    fam = rs.set_by_name(r.record_set or "").family
    return (f"meta l4proto {{ tcp, udp }} add @{r.record_set} {{ {fam} saddr . th dport }}"
            + (f' comment "{r.comment}"' if r.comment else ""))


def _rule_text(rs: Ruleset, r: FilterRule) -> str:
    if r.verdict == "record":
        return _record_text(rs, r)
    parts: list[str] = []
    fam = rs.rule_family(r)
    if r.iif is not None:
        parts.append(f'iif "{r.iif}"')
    if r.ct_state:
        parts.append("ct state " + ",".join(r.ct_state))
    if r.source_set is not None:
        parts.append(f"{fam} saddr @{r.source_set}")
    elif r.family is not None and not r.icmp_types:
        parts.append(f"meta nfproto {NFPROTO[r.family]}")
    if r.icmp_types:
        assert fam is not None
        types = r.icmp_types
        parts.append(f"{ICMP_PAYLOAD[fam]} type " + (types[0] if len(types) == 1 else "{ " + ", ".join(types) + " }"))
    elif r.proto in ("tcp", "udp"):
        parts.append(f"{r.proto} dport {_ports_text(r.ports)}" if r.ports else f"meta l4proto {r.proto}")
    elif r.proto == "icmp":
        parts.append(f"meta l4proto {ICMP_PROTO[fam]}" if fam else "meta l4proto { icmp, ipv6-icmp }")
    if r.limit is not None:
        parts.append(f"limit rate {r.limit}")
    if r.verdict == "log":
        parts.append(f'log prefix "{r.log_prefix or ""}"')
    elif r.verdict == "reject":
        parts.append("reject with tcp reset" if r.proto == "tcp" else "reject with icmpx admin-prohibited")
    else:
        parts.append(r.verdict)
    if r.comment:
        parts.append(f'comment "{r.comment}"')
    return " ".join(parts)


def _set_text(s: AddressSet) -> list[str]:
    lines = [f"\tset {s.name} {{", f"\t\ttype {ADDR_TYPE[s.family]}" + (" . inet_service" if s.with_port else "")]
    if s.interval:
        lines.append("\t\tflags interval")
    if s.with_port:  # filled by a rule (dynamic); the kernel lists the flags in this order
        lines.append("\t\tflags dynamic,timeout")
    elif s.timeout:
        lines.append("\t\tflags timeout")
    if s.timeout_s is not None:
        lines.append(f"\t\ttimeout {s.timeout_s}s")
    if s.size is not None:
        lines.append(f"\t\tsize {s.size}")
    if s.elements:
        lines.append("\t\telements = { " + ", ".join(s.elements) + " }")
    lines.append("\t}")
    return lines


def to_nft_text(rs: Ruleset, ruleset_hash: str | None = None) -> str:
    """nftables syntax: one idempotent transaction for ``nft -f`` that replaces our table only.
    ``ruleset_hash`` (printed in the header) is computed when not given."""
    t = rs.table
    lines = [
        f"# policymesh ruleset for node {rs.node_id or '-'}, policy serial {rs.policy_serial or 'none'}",
        f"# ruleset hash {ruleset_hash or _digest_of(rs)}",
        f"# {rs.rule_count} rules, {len(rs.sets)} sets, {rs.element_count} set elements",
    ]
    for ex in rs.excluded:
        lines.append(f"# excluded: {ex.node_id} ({ex.cert_id}): {ex.reason}")
    lines += [
        f"table {FAMILY} {t} {{}}",
        f"delete table {FAMILY} {t}",
        f"table {FAMILY} {t} {{",
    ]
    for s in rs.sets:
        lines += _set_text(s)
        lines.append("")
    lines.append(f"\tchain {CHAIN} {{")
    lines.append("\t\ttype filter hook input priority filter; policy drop;")
    for r in rs.rules:
        lines.append("\t\t" + _rule_text(rs, r))
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


# -- JSON ------------------------------------------------------------------------------------------
def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _anon(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


def _port_items(ports: tuple[tuple[int, int], ...]) -> list[Any]:
    return [lo if lo == hi else {"range": [lo, hi]} for lo, hi in ports]


def _record_expr(rs: Ruleset, r: FilterRule) -> list[dict[str, Any]]:
    fam = rs.set_by_name(r.record_set or "").family
    key = {"concat": [_payload(fam, "saddr"), _payload("th", "dport")]}
    return [_match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            {"set": {"op": "add", "elem": key, "set": f"@{r.record_set}"}}]


def _rule_expr(rs: Ruleset, r: FilterRule) -> list[dict[str, Any]]:
    if r.verdict == "record":
        return _record_expr(rs, r)
    expr: list[dict[str, Any]] = []
    fam = rs.rule_family(r)
    if r.iif is not None:
        expr.append(_match(_meta("iif"), r.iif))
    if r.ct_state:
        states = list(r.ct_state)
        expr.append(_match({"ct": {"key": "state"}}, states[0] if len(states) == 1 else states, op="in"))
    if r.source_set is not None:
        expr.append(_match(_payload(fam or "ip", "saddr"), f"@{r.source_set}"))
    elif r.family is not None and not r.icmp_types:
        expr.append(_match(_meta("nfproto"), NFPROTO[r.family]))
    if r.icmp_types:
        expr.append(_match(_payload(ICMP_PAYLOAD[fam or "ip"], "type"), _anon(list(r.icmp_types))))
    elif r.proto in ("tcp", "udp"):
        if r.ports:
            expr.append(_match(_payload(r.proto, "dport"), _anon(_port_items(r.ports))))
        else:
            expr.append(_match(_meta("l4proto"), r.proto))
    elif r.proto == "icmp":
        expr.append(_match(_meta("l4proto"), ICMP_PROTO[fam] if fam else {"set": ["icmp", "ipv6-icmp"]}))
    if r.limit is not None:
        rate, per = r.limit.split("/")
        expr.append({"limit": {"rate": int(rate), "burst": 5, "per": per}})
    if r.verdict == "log":
        expr.append({"log": {"prefix": r.log_prefix or ""}})
    elif r.verdict == "reject":
        expr.append({"reject": {"type": "tcp reset"}} if r.proto == "tcp"
                    else {"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
    else:
        expr.append({r.verdict: None})
    return expr


def _elem_json(e: str, interval: bool) -> Any:
    if interval and "/" in e:
        net = ipaddress.ip_network(e)
        if net.prefixlen != net.max_prefixlen:
            return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
        return str(net.network_address)
    return e


def set_json(table: str, s: AddressSet, with_elements: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = {"family": FAMILY, "table": table, "name": s.name,
                           "type": [ADDR_TYPE[s.family], "inet_service"] if s.with_port else ADDR_TYPE[s.family]}
    if s.interval or s.timeout:
        # nft 1.0.6 refuses "dynamic" in JSON and sets it itself for a set a rule adds to (the text form
        # names it; both load to the same kernel set)
        obj["flags"] = ["interval"] if s.interval else ["timeout"]
    if s.timeout_s is not None:
        obj["timeout"] = s.timeout_s
    if s.size is not None:
        obj["size"] = s.size
    if with_elements and s.elements:
        obj["elem"] = [_elem_json(e, s.interval) for e in s.elements]
    return obj


def to_nft_json(rs: Ruleset) -> dict[str, Any]:
    """nftables JSON (the ``nft -j -f`` input format): the same transaction as :func:`to_nft_text`."""
    t = rs.table
    table = {"family": FAMILY, "name": t}
    cmds: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
        {"add": {"table": dict(table)}},
    ]
    for s in rs.sets:
        cmds.append({"add": {"set": set_json(t, s)}})
    cmds.append({"add": {"chain": {"family": FAMILY, "table": t, "name": CHAIN, "type": "filter",
                                   "hook": "input", "prio": PRIORITY, "policy": "drop"}}})
    cmds += [{"add": {"rule": rule_json(rs, r)}} for r in rs.rules]
    return {"nftables": cmds}


def rule_json(rs: Ruleset, r: FilterRule) -> dict[str, Any]:
    """One rule of ``rs``'s chain as an nft JSON rule object."""
    rule: dict[str, Any] = {"family": FAMILY, "table": rs.table, "chain": CHAIN}
    if r.comment:
        rule["comment"] = r.comment
    rule["expr"] = _rule_expr(rs, r)
    return rule


def set_update_json(table: str, changes: list[tuple[AddressSet, AddressSet]]) -> dict[str, Any]:
    """One transaction that changes set elements in place: for each (old, new) pair, delete what left
    and add what arrived.  nft refuses to delete an element that is not there, so a set edited behind
    our back makes this fail (and the caller replaces the whole table)."""
    cmds: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
    for old, new in changes:
        ref = {"family": FAMILY, "table": table, "name": new.name}
        before, after = set(old.elements), set(new.elements)
        gone = [e for e in old.elements if e not in after]
        came = [e for e in new.elements if e not in before]
        if gone:
            cmds.append({"delete": {"element": {**ref, "elem": [_elem_json(e, old.interval) for e in gone]}}})
        if came:
            cmds.append({"add": {"element": {**ref, "elem": [_elem_json(e, new.interval) for e in came]}}})
    return {"nftables": cmds}


def _digest_of(rs: Ruleset) -> str:
    from .nft_digest import ruleset_digest  # the digest is computed from this module's forms

    return ruleset_digest(rs).hash
