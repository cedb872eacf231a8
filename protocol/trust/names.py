"""Names, addresses and numbers as signed objects, policies and configs spell them: checked whole, ASCII.

Three traps this module exists to avoid, everywhere at once:

* ``$`` matches before a final newline, so ``re.match(r"^[a-z]+$", "evil\\n")`` succeeds: every pattern
  here is anchored with ``\\A...\\Z`` *and* applied with ``fullmatch``;
* ``\\d`` and ``str.isdigit`` accept non-ASCII digits (``"٧"``, ``"７"``, ``"²"``) that ``int`` then reads
  (or chokes on): numbers are ``[0-9]`` under ``re.ASCII``;
* ``ipaddress`` accepts IPv6 scope ids with any character after ``%`` (``"fe80::1%eth0\\n"``, NUL,
  Cyrillic): a mesh address or prefix never carries one.
"""

from __future__ import annotations

import ipaddress
import re

# Node ids, regions, roles, rule names, cluster names, certificate ids.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z", re.ASCII)
NAME_RULE = "letters, digits, '_', '.', '-' (max 64)"
_PORT_RE = re.compile(r"\A[0-9]{1,5}\Z", re.ASCII)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_name(value: object) -> bool:
    """True for a valid name: ASCII letters and digits, then also ``_ . -``; 1 to 64 characters."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def _plain(text: str, what: str) -> None:
    if not text.isascii() or not text.isprintable() or "%" in text:
        raise ValueError(f"{text!r} is not a plain {what} (ASCII, no scope id, no control characters)")


def parse_address(text: str) -> IPAddress:
    """An IPv4 or IPv6 host address without a scope id; ValueError otherwise."""
    _plain(text, "IP address")
    return ipaddress.ip_address(text)


def parse_network(text: str, *, strict: bool = True) -> IPNetwork:
    """An IPv4 or IPv6 prefix without a scope id; ValueError otherwise (host bits set, with ``strict``)."""
    _plain(text, "IP prefix")
    return ipaddress.ip_network(text, strict=strict)


def parse_port_number(text: str) -> int:
    """A decimal port 0-65535 in ASCII digits; ValueError otherwise."""
    if _PORT_RE.fullmatch(text) is None or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port number (0-65535)")
    return int(text)
