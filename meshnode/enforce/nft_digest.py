"""The hash of a ruleset, and of what the kernel holds: the same canonical form from either side.

``normalize()`` turns either our rendered JSON (:mod:`.nft`) or ``nft -j list table inet <name>`` into
the same canonical structure (handles, counter values and element order dropped; addresses canonical),
so the kernel's hash equals ``ruleset_digest(rs).hash`` exactly when the kernel holds that ruleset.
That hash is every backend's name for a ruleset.

Both sides skip work they did before: a rule's normalised text is remembered per rule (a version
changes a few of a few hundred), and a kernel listing whose rules are, field for field, the rules we
rendered for the applied ruleset takes their remembered texts instead of normalising them again
(:func:`listing_hash`).  The tests compare both with normalising everything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any

from .model import FilterRule, Ruleset
from .nft import CHAIN, FAMILY, _rule_expr, rule_json, to_nft_json


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


_RULES_MARK = "\0rules"  # stands for a chain's rules while the rest is serialised (no name holds a NUL)
_RULE_TEXT_MAX = 8192  # normalised rules remembered (a node renders a few hundred per version)
_normalized_rules: dict[tuple[FilterRule, str | None], str] = {}


def _normalized_rule_text(rs: Ruleset, r: FilterRule) -> str:
    """The JSON text :func:`normalized_hash` gives rule ``r`` of ``rs`` after :func:`normalize`: the same
    for the same rule and family whatever the version, so computed once per process."""
    fam = rs.set_by_name(r.record_set or "").family if r.verdict == "record" else rs.rule_family(r)
    key = (r, fam)
    text = _normalized_rules.get(key)
    if text is None:
        norm = {"comment": r.comment or None, "expr": _canon_expr(_rule_expr(rs, r))}
        text = json.dumps(norm, sort_keys=True, separators=(",", ":"))
        if len(_normalized_rules) >= _RULE_TEXT_MAX:
            _normalized_rules.clear()
        _normalized_rules[key] = text
    return text


def _hash_with_rules(norm: dict[str, Any], rules: str) -> str:
    """:func:`normalized_hash` of ``norm`` whose one chain's rules are the mark, with ``rules`` (their
    normalised JSON text) in the mark's place."""
    text = json.dumps(norm, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.replace(_MARK_JSON, rules, 1).encode()).hexdigest()


_MARK_JSON = json.dumps(_RULES_MARK)


def _rules_text(rs: Ruleset) -> str:
    return "[" + ",".join(_normalized_rule_text(rs, r) for r in rs.rules) + "]"


def ruleset_digest(rs: Ruleset) -> RulesetDigest:
    """The digest of ``rs``: ``normalized_hash`` of ``normalize(to_nft_json(rs))`` and of its structure,
    computed without building and normalising every rule again (each rule's normalised text is
    remembered; the tests compare both ways)."""
    norm = normalize(to_nft_json(Ruleset(rs.table, rs.sets, (), rs.node_id, rs.policy_serial, rs.default_action)))
    norm[f"{FAMILY} {rs.table}"]["chains"][CHAIN]["rules"] = _RULES_MARK
    rules = _rules_text(rs)
    return RulesetDigest(_hash_with_rules(norm, rules), _hash_with_rules(strip_elements(norm), rules))


def listing_hash(doc: dict[str, Any], applied: Ruleset | None = None) -> str:
    """``normalized_hash(normalize(doc))`` of a kernel listing of one table.  When the listing's rules
    are exactly the rules rendered for ``applied`` (the usual read-back), their remembered normalised
    texts are used instead of normalising them again."""
    if applied is not None:
        entries = doc.get("nftables", [])
        ours: list[dict[str, Any]] = []
        rest: list[Any] = []
        for entry in entries:
            rule = entry.get("rule") if isinstance(entry, dict) else None
            if isinstance(rule, dict) and rule.get("table") == applied.table:
                ours.append(rule)
            else:
                rest.append(entry)
        if len(ours) == len(applied.rules) and all(
                {k: v for k, v in got.items() if k != "handle"} == rule_json(applied, r)
                for got, r in zip(ours, applied.rules, strict=True)):
            norm = normalize({"nftables": rest})
            chain = norm.get(f"{FAMILY} {applied.table}", {}).get("chains", {}).get(CHAIN)
            if chain is not None and chain["rules"] == []:
                chain["rules"] = _RULES_MARK
                return _hash_with_rules(norm, _rules_text(applied))
    return normalized_hash(normalize(doc))
