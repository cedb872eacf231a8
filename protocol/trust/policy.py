"""The policy document operators write in TOML: parsing, validation, canonical form, and back to TOML.

    [defaults]  inbound = "drop" | "reject"; mode = "enforce" | "log"
    [[allow]]   name, from = [selectors], to = [selectors], ports = ["tcp/N", "udp/N-M", "icmp"], mode?
    [revoke]    nodes = [...], certs = [...]

Selectors: ``role:NAME``, ``role:*``, ``node:ID``, ``cidr:PREFIX`` (``cidr`` only in ``from``).
Errors name the rule and the field, so an operator can fix the file without reading code.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import msgspec

from protocol.errors import PolicyError
from protocol.trust.names import (
    NAME_RE as NAME_RE,  # re-exported: the name rule lives in protocol.trust.names
)
from protocol.trust.names import NAME_RULE, is_name, parse_network

INBOUND_ACTIONS = ("drop", "reject")
MODES = ("enforce", "log")
PROTOCOLS = ("tcp", "udp")
MAX_RULES = 4096
MAX_SELECTORS = 1024
_PORT_DIGITS = re.compile(r"\A[0-9]{1,5}\Z", re.ASCII)


class Defaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    inbound: str = "drop"
    mode: str = "enforce"


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    sources: tuple[str, ...] = msgspec.field(name="from")
    to: tuple[str, ...]
    ports: tuple[str, ...]
    mode: str | None = None


class PolicyDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    defaults: Defaults = Defaults()
    allow: tuple[Rule, ...] = ()


class Revocations(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    nodes: tuple[str, ...] = ()
    certs: tuple[str, ...] = ()


class PortSpec(msgspec.Struct, frozen=True):
    """A parsed port entry: ``proto`` is tcp, udp or icmp; ``lo``/``hi`` are 0 for icmp."""

    proto: str
    lo: int = 0
    hi: int = 0


def parse_port(spec: str) -> PortSpec:
    """Parse ``tcp/N``, ``udp/N``, ``tcp/N-M`` or ``icmp``; ValueError with a readable reason."""
    if spec == "icmp":
        return PortSpec("icmp")
    proto, sep, rng = spec.partition("/")
    if not sep or proto not in PROTOCOLS:
        raise ValueError(f"{spec!r} is not tcp/N, udp/N, tcp/N-M, udp/N-M or icmp")
    lo_s, dash, hi_s = rng.partition("-")
    if not _PORT_DIGITS.fullmatch(lo_s) or (dash and not _PORT_DIGITS.fullmatch(hi_s)):
        raise ValueError(f"{spec!r}: port must be a number or a range N-M (ASCII digits)")
    lo = int(lo_s)
    hi = int(hi_s) if dash else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise ValueError(f"{spec!r}: ports are 1-65535")
    if lo > hi:
        raise ValueError(f"{spec!r}: range start is above its end")
    return PortSpec(proto, lo, hi)


def parse_selector(sel: str, *, allow_cidr: bool) -> tuple[str, str]:
    """Return (kind, value) for a selector; ValueError with a readable reason."""
    kind, sep, value = sel.partition(":")
    if not sep or not value:
        raise ValueError(f"{sel!r} is not role:NAME, role:*, node:ID or cidr:PREFIX")
    if kind == "role":
        if value != "*" and not is_name(value):
            raise ValueError(f"{sel!r}: role names are {NAME_RULE}")
    elif kind == "node":
        if not is_name(value):
            raise ValueError(f"{sel!r}: node ids are {NAME_RULE}")
    elif kind == "cidr":
        if not allow_cidr:
            raise ValueError(f"{sel!r}: cidr selectors are only allowed in 'from'")
        try:
            net = parse_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{sel!r}: {exc}") from None
        value = str(net)
    else:
        raise ValueError(f"{sel!r}: unknown selector kind {kind!r} (role, node, cidr)")
    return kind, value


def _str_list(rule_label: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{rule_label}: '{field}' must be a list of strings")
    if not value:
        raise PolicyError(f"{rule_label}: '{field}' must not be empty")
    if len(value) > MAX_SELECTORS:
        raise PolicyError(f"{rule_label}: '{field}' has more than {MAX_SELECTORS} entries")
    return value


def _canonical_list(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(items)))


def validate_document(doc: PolicyDocument) -> PolicyDocument:
    """Check every rule and return the canonical form (selectors and ports deduplicated and sorted,
    cidr prefixes normalised; rule order kept). Raises PolicyError naming the rule and field."""
    if doc.defaults.inbound not in INBOUND_ACTIONS:
        raise PolicyError(
            f"defaults.inbound = {doc.defaults.inbound!r}: must be one of {', '.join(INBOUND_ACTIONS)}"
            " (an allow-all default is never accepted)"
        )
    if doc.defaults.mode not in MODES:
        raise PolicyError(f"defaults.mode = {doc.defaults.mode!r}: must be one of {', '.join(MODES)}")
    if len(doc.allow) > MAX_RULES:
        raise PolicyError(f"{len(doc.allow)} rules: at most {MAX_RULES} are allowed")
    seen: set[str] = set()
    rules: list[Rule] = []
    for i, rule in enumerate(doc.allow):
        label = f"allow[{i}]" + (f" ({rule.name!r})" if isinstance(rule.name, str) else "")
        if not is_name(rule.name):
            raise PolicyError(f"{label}: 'name' must be {NAME_RULE}")
        if rule.name in seen:
            raise PolicyError(f"{label}: duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        label = f"rule {rule.name!r}"
        sources = []
        for s in _str_list(label, "from", list(rule.sources)):
            try:
                kind, value = parse_selector(s, allow_cidr=True)
            except ValueError as exc:
                raise PolicyError(f"{label}: 'from': {exc}") from None
            sources.append(f"{kind}:{value}")
        targets = []
        for s in _str_list(label, "to", list(rule.to)):
            try:
                kind, value = parse_selector(s, allow_cidr=False)
            except ValueError as exc:
                raise PolicyError(f"{label}: 'to': {exc}") from None
            targets.append(f"{kind}:{value}")
        ports = []
        for p in _str_list(label, "ports", list(rule.ports)):
            try:
                parse_port(p)
            except ValueError as exc:
                raise PolicyError(f"{label}: 'ports': {exc}") from None
            ports.append(p)
        if rule.mode is not None and rule.mode not in MODES:
            raise PolicyError(f"{label}: 'mode' = {rule.mode!r}: must be one of {', '.join(MODES)}")
        rules.append(
            Rule(
                name=rule.name,
                sources=_canonical_list(sources),
                to=_canonical_list(targets),
                ports=_canonical_list(ports),
                mode=rule.mode,
            )
        )
    return PolicyDocument(defaults=doc.defaults, allow=tuple(rules))


def validate_revocations(rev: Revocations) -> Revocations:
    for field, items in (("nodes", rev.nodes), ("certs", rev.certs)):
        for item in items:
            if not is_name(item):
                raise PolicyError(f"revoke.{field}: {item!r} is not a valid id")
    return Revocations(nodes=_canonical_list(rev.nodes), certs=_canonical_list(rev.certs))


_FAST_SELECTOR = re.compile(
    r"\A(?:role:(?:\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})|node:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})\Z", re.ASCII)
_FAST_PORT = re.compile(r"\A(?:icmp|(?:tcp|udp)/([1-9][0-9]{0,4})(?:-([1-9][0-9]{0,4}))?)\Z", re.ASCII)


def _sorted_unique(items: tuple[str, ...]) -> bool:
    return len(items) < 2 or list(items) == sorted(set(items))


def is_canonical(doc: PolicyDocument) -> bool:
    """Fast check that a decoded document is valid and already canonical (the verifier's hot path).
    False means "use validate_document to find out": it never accepts what validate_document rejects."""
    if doc.defaults.inbound not in INBOUND_ACTIONS or doc.defaults.mode not in MODES or len(doc.allow) > MAX_RULES:
        return False
    names = set()
    for r in doc.allow:
        if not is_name(r.name) or r.name in names or (r.mode is not None and r.mode not in MODES):
            return False
        names.add(r.name)
        for items in (r.sources, r.to, r.ports):
            if not items or len(items) > MAX_SELECTORS or not _sorted_unique(items):
                return False
        # cidr selectors take the slow path
        if not all(map(_FAST_SELECTOR.fullmatch, r.sources)) or not all(map(_FAST_SELECTOR.fullmatch, r.to)):
            return False
        for port in r.ports:
            m = _FAST_PORT.fullmatch(port)
            if not m:
                return False
            if m.group(1):
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) else lo
                if lo > 65535 or hi > 65535 or lo > hi:
                    return False
    return True


_KNOWN_TOP = {"defaults", "allow", "revoke"}


def parse_policy_toml(text: str) -> tuple[PolicyDocument, Revocations]:
    """Parse and validate an operator's policy TOML; PolicyError with a readable message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}") from None
    unknown = set(data) - _KNOWN_TOP
    if unknown:
        raise PolicyError(f"unknown top-level key(s): {', '.join(sorted(unknown))} (expected defaults, allow, revoke)")
    allow = data.get("allow", [])
    if not isinstance(allow, list):
        raise PolicyError("'allow' must be an array of tables: use [[allow]]")
    for i, rule in enumerate(allow):
        if not isinstance(rule, dict):
            raise PolicyError(f"allow[{i}]: must be a table")
        label = f"allow[{i}]" + (f" ({rule['name']!r})" if isinstance(rule.get("name"), str) else "")
        for field in ("name", "from", "to", "ports"):
            if field not in rule:
                raise PolicyError(f"{label}: missing field '{field}'")
        extra = set(rule) - {"name", "from", "to", "ports", "mode"}
        if extra:
            raise PolicyError(f"{label}: unknown field(s) {', '.join(sorted(extra))}")
    try:
        doc = msgspec.convert({k: v for k, v in data.items() if k != "revoke"}, PolicyDocument)
        rev = msgspec.convert(data.get("revoke", {}), Revocations)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid policy: {exc}") from None
    return validate_document(doc), validate_revocations(rev)


def to_toml(doc: PolicyDocument, rev: Revocations | None = None) -> str:
    """Render a document back to operator TOML (used by `policy inspect`)."""

    def arr(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{x}"' for x in items) + "]"

    lines = ["[defaults]", f'inbound = "{doc.defaults.inbound}"', f'mode = "{doc.defaults.mode}"']
    for r in doc.allow:
        lines += ["", "[[allow]]", f'name = "{r.name}"', f"from = {arr(r.sources)}", f"to = {arr(r.to)}",
                  f"ports = {arr(r.ports)}"]
        if r.mode:
            lines.append(f'mode = "{r.mode}"')
    if rev and (rev.nodes or rev.certs):
        lines += ["", "[revoke]", f"nodes = {arr(rev.nodes)}", f"certs = {arr(rev.certs)}"]
    return "\n".join(lines) + "\n"
