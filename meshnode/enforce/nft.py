"""nftables serialisation of a :class:`Ruleset`, and normalisation of the kernel's JSON listing.

Both forms are one idempotent transaction that touches only ``table inet <name>``::

    add table inet policymesh          # exists afterwards, whether or not it did before
    delete table inet policymesh       # so this never fails
    table inet policymesh { ... }      # the full definition

nft applies a file as one kernel transaction: either all of it takes effect or none of it does.

``normalize()`` turns either our rendered JSON or ``nft -j list table inet <name>`` into the same
canonical structure (handles, counter values and element order dropped; addresses canonical), so the
kernel's hash equals ``ruleset_digest(rs).hash`` exactly when the kernel holds that ruleset.  That hash
is every backend's name for a ruleset.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from dataclasses import dataclass
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
        f"# ruleset hash {ruleset_hash or ruleset_digest(rs).hash}",
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
    for r in rs.rules:
        rule: dict[str, Any] = {"family": FAMILY, "table": t, "chain": CHAIN}
        if r.comment:
            rule["comment"] = r.comment
        rule["expr"] = _rule_expr(rs, r)
        cmds.append({"add": {"rule": rule}})
    return {"nftables": cmds}


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


# -- normalisation ---------------------------------------------------------------------------------
def canonical_address(text: str) -> tuple[str, str, bytes] | None:
    """(family, canonical text, packed bytes) of a host address, or None if it is not one (or scoped).

    inet_pton/inet_ntop: the same canonical text nft prints, and fast enough for 10^5 addresses."""
    if "%" in text:
        return None
    af = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        packed = socket.inet_pton(af, text)
    except OSError:
        return None
    return ("ip6" if af == socket.AF_INET6 else "ip"), socket.inet_ntop(af, packed), packed


def _canon_prefix(addr: str, plen: int) -> str:
    parsed = canonical_address(addr)
    if parsed is None:
        return f"{addr}/{plen}"
    fam, text, _ = parsed
    if plen == (32 if fam == "ip" else 128):
        return text
    return str(ipaddress.ip_network(f"{text}/{plen}", strict=False))


def canonical_element(e: Any) -> str:
    """Canonical text of a set element (address, prefix or range; host prefixes as plain addresses)."""
    if isinstance(e, dict) and "elem" in e:  # element with options (timeout, comment...)
        e = e["elem"].get("val")
    if isinstance(e, str):
        if "/" in e:
            addr, _, plen = e.partition("/")
            return _canon_prefix(addr, int(plen)) if plen.isdigit() else e
        parsed = canonical_address(e)
        return parsed[1] if parsed else e
    if isinstance(e, dict) and "prefix" in e:
        return _canon_prefix(str(e["prefix"]["addr"]), int(e["prefix"]["len"]))
    if isinstance(e, dict) and "range" in e:
        lo, hi = (str(ipaddress.ip_address(x)) for x in e["range"])
        nets: list[Any] = list(ipaddress.summarize_address_range(ipaddress.ip_address(lo), ipaddress.ip_address(hi)))
        if len(nets) == 1:
            return canonical_element({"prefix": {"addr": str(nets[0].network_address), "len": nets[0].prefixlen}})
        return f"{lo}-{hi}"
    return json.dumps(e, sort_keys=True)


def _canon_expr(x: Any) -> Any:
    """Recursively drop counter values; sort anonymous sets (their order has no meaning)."""
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            if k == "counter":
                out[k] = None
            elif k == "set" and isinstance(v, list):
                items = [_canon_expr(i) for i in v]
                out[k] = sorted(items, key=lambda i: json.dumps(i, sort_keys=True))
            else:
                out[k] = _canon_expr(v)
        return out
    if isinstance(x, list):
        return [_canon_expr(i) for i in x]
    return x


def normalize(doc: dict[str, Any]) -> dict[str, Any]:
    """Canonical form of an nft JSON document (our transaction or the kernel's listing of one table)."""
    tables: dict[tuple[str, str], dict[str, Any]] = {}

    def table_of(obj: dict[str, Any]) -> dict[str, Any]:
        key = (obj.get("family", ""), obj.get("table", obj.get("name", "")))
        return tables.setdefault(key, {"sets": {}, "chains": {}})

    for entry in doc.get("nftables", []):
        if "metainfo" in entry:
            continue
        if "delete" in entry:
            obj = entry["delete"]
            if "table" in obj:
                tables.pop((obj["table"].get("family", ""), obj["table"].get("name", "")), None)
            continue
        obj = entry.get("add", entry)
        if "table" in obj:
            table_of(obj["table"])
        elif "set" in obj:
            s = obj["set"]
            flags = s.get("flags", [])
            # "dynamic" (filled by a rule) is implied by the rule and not listed by every nft version
            flags = [f for f in ([flags] if isinstance(flags, str) else flags) if f != "dynamic"]
            dynamic = "timeout" in flags  # elements added at run time, expiring: not part of the ruleset
            body = table_of(s)["sets"][s["name"]] = {
                "type": s.get("type"),
                "flags": sorted(flags),
                "elem": [] if dynamic else sorted({canonical_element(e) for e in s.get("elem", [])}),
            }
            for key in ("timeout", "size"):  # only when set: the hashes of sets without them stay as they were
                if s.get(key) is not None:
                    body[key] = s[key]
        elif "chain" in obj:
            c = obj["chain"]
            chain = table_of(c)["chains"].setdefault(c["name"], {"rules": []})
            chain.update({k: c.get(k) for k in ("type", "hook", "prio", "policy")})
        elif "rule" in obj:
            r = obj["rule"]
            chain = table_of(r)["chains"].setdefault(r["chain"], {"rules": []})
            chain["rules"].append({"comment": r.get("comment"), "expr": _canon_expr(r.get("expr", []))})
        elif "element" in obj:
            e = obj["element"]
            target = table_of(e)["sets"].get(e["name"])
            if target is not None and "timeout" not in target["flags"]:
                target["elem"] = sorted(set(target["elem"]) | {canonical_element(x) for x in e.get("elem", [])})
    return {f"{fam} {name}": body for (fam, name), body in sorted(tables.items())}


def normalized_hash(norm: dict[str, Any]) -> str:
    """SHA-256 of a normalised document (see :func:`normalize`)."""
    return hashlib.sha256(json.dumps(norm, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def strip_elements(norm: dict[str, Any]) -> dict[str, Any]:
    """A normalised document without set elements (its structure)."""
    out: dict[str, Any] = {}
    for key, body in norm.items():
        out[key] = {
            "sets": {n: {k: v for k, v in s.items() if k != "elem"} for n, s in body["sets"].items()},
            "chains": body["chains"],
        }
    return out


@dataclass(frozen=True, slots=True)
class RulesetDigest:
    """The two hashes of a ruleset, computed from one normalisation (the costly part at 10^4 members)."""

    hash: str  # of the normalised nftables form: equal to the kernel's when it holds this ruleset
    structure_hash: str  # of everything but set elements: equal structure means a set update is enough


def ruleset_digest(rs: Ruleset, doc: dict[str, Any] | None = None) -> RulesetDigest:
    """The digest of ``rs``; ``doc``: its :func:`to_nft_json` when the caller built it already (the
    nftables backend loads that same document: built once per apply)."""
    norm = normalize(doc if doc is not None else to_nft_json(rs))
    return RulesetDigest(normalized_hash(norm), normalized_hash(strip_elements(norm)))
