"""Port audit: the sockets listening on non-loopback addresses, compared with what the enforced ruleset
exposes and with what the operator declared in ``[validate] expected_listeners``.

    listeners = read_listeners()                                   # /proc/net/{tcp,tcp6,udp,udp6} + owners
    findings = audit_ports(listeners, ruleset, expected={"tcp/5432", "tcp/7946"})
    # {"tcp/8080": Finding(kind="undeclared_listener", ...), "udp/53": Finding(kind="missing_listener", ...)}

Findings (check ``port_audit``, subject ``<proto>/<port>``):

* ``undeclared_listener`` (warning): something listens on a port that an accept rule of the ruleset opens
  to some source, and the operator did not declare it: an engineer opened the wrong port, or a service
  appeared that nobody reviewed. Names the port, the process and the rule(s) exposing it.
* ``missing_listener`` (warning): a declared service has nothing listening on a non-loopback address.
* ``unexposed_listener`` (info): an undeclared listener that no rule opens (the chain drops it anyway).
  Returned by :func:`audit_ports` only with ``include_info=True``; not an alert.

Loopback listeners (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) are ignored; a UDP socket is a listener when
it is bound and not connected (remote address zero). Break-glass rules (sources from the node's own
``[overrides]``) open every port to the operator and are not counted as exposing a listener.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..enforce.model import FilterRule, Ruleset
from .findings import Finding

CHECK = "port_audit"
TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # TCP_CLOSE: a bound, unconnected UDP socket
PROC_NET_FILES = (("tcp", "tcp", "ip"), ("tcp6", "tcp", "ip6"), ("udp", "udp", "ip"), ("udp6", "udp", "ip6"))
BREAK_GLASS_SET_PREFIX = "breakglass_"  # render.py names the break-glass sets breakglass_v4 / _v6
MAX_PROCESS_LINKS = 200_000  # bound the /proc/*/fd walk on a host with a huge number of descriptors


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket accepting connections (TCP LISTEN) or datagrams (bound, unconnected UDP)."""

    proto: str
    address: str
    port: int
    inode: int
    process: str = "?"  # "comm[pid]", or "?" when the owner could not be read

    @property
    def subject(self) -> str:
        return f"{self.proto}/{self.port}"

    @property
    def family(self) -> str:
        return "ip6" if ":" in self.address else "ip"

    def is_loopback(self) -> bool:
        addr = ipaddress.ip_address(self.address)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped.is_loopback
        return addr.is_loopback


def decode_address(hex_addr: str) -> str:
    """``0100007F`` -> ``127.0.0.1``; IPv6 as four 32-bit words, each in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    if len(raw) == 16:
        return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    raise ValueError(f"address {hex_addr!r} is neither 4 nor 16 bytes")


def parse_proc_net(text: str, proto: str) -> list[Listener]:
    """The listeners in one ``/proc/net/{tcp,tcp6,udp,udp6}`` table (loopback included)."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
        if proto == "tcp" and state != TCP_LISTEN:
            continue
        if proto == "udp" and (state != UDP_UNCONNECTED or int(remote.split(":")[1], 16) != 0):
            continue
        addr_hex, port_hex = local.split(":")
        port = int(port_hex, 16)
        if port == 0:
            continue
        out.append(Listener(proto, decode_address(addr_hex), port, inode))
    return out


def socket_owners(inodes: Iterable[int], proc: Path = Path("/proc")) -> dict[int, str]:
    """inode -> ``comm[pid]`` for the sockets in ``inodes``, from the ``socket:[N]`` links in
    ``/proc/PID/fd``. Processes that vanish or that we may not read are skipped."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    owners: dict[int, str] = {}
    if not wanted:
        return owners
    seen = 0
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            links = os.scandir(f"{entry.path}/fd")
            with links:
                for fd in links:
                    seen += 1
                    inode = wanted.get(os.readlink(fd.path)) if seen <= MAX_PROCESS_LINKS else None
                    if inode is not None and inode not in owners:
                        comm = Path(entry.path, "comm").read_text().strip()
                        owners[inode] = f"{comm}[{entry.name}]"
        except OSError:  # gone, or not ours to read
            continue
        if len(owners) == len(wanted) or seen > MAX_PROCESS_LINKS:
            break
    return owners


def read_listeners(proc: Path = Path("/proc")) -> list[Listener]:
    """Every non-loopback listener of this network namespace, with its owning process (``?`` for
    processes this one may not see: under the hardened unit, ``ProtectProc=invisible``, that is all of
    them but the daemon's own). Read through ``/proc/self/net``, which ``ProcSubset=pid`` keeps."""
    found: list[Listener] = []
    for name, proto, _family in PROC_NET_FILES:
        try:
            text = (proc / "self" / "net" / name).read_text()
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        found.extend(x for x in parse_proc_net(text, proto) if not x.is_loopback())
    owners = socket_owners({x.inode for x in found}, proc)
    return sorted(
        (Listener(x.proto, x.address, x.port, x.inode, owners.get(x.inode, "?")) for x in found),
        key=lambda x: (x.proto, x.port, x.address),
    )


def exposing_rules(ruleset: Ruleset, proto: str, port: int, families: Iterable[str] = ("ip", "ip6")) -> list[FilterRule]:
    """The accept rules that let a new connection from some source reach ``proto``/``port`` (rules on
    connection state or on the loopback interface, and break-glass rules, do not count)."""
    fams = set(families)
    out = []
    for rule in ruleset.rules:
        if rule.verdict != "accept" or rule.ct_state or rule.iif is not None:
            continue
        if rule.source_set is not None and rule.source_set.startswith(BREAK_GLASS_SET_PREFIX):
            continue
        if rule.proto is not None and rule.proto != proto:
            continue
        if rule.ports and not any(lo <= port <= hi for lo, hi in rule.ports):
            continue
        family = ruleset.rule_family(rule)
        if family is not None and family not in fams:
            continue
        out.append(rule)
    return out


def _families(listeners: Iterable[Listener]) -> set[str]:
    fams: set[str] = set()
    for x in listeners:
        if x.address == "::":  # the unspecified IPv6 address also takes IPv4 unless IPV6_V6ONLY
            fams.update(("ip", "ip6"))
        else:
            fams.add(x.family)
    return fams


def _describe(rule: FilterRule) -> str:
    """``allow web-to-app from role_web_v4`` / ``default (log mode) from anyone``."""
    return f"{rule.comment or rule.verdict} from {rule.source_set or 'anyone'}"


def parse_expected(expected: Iterable[str]) -> set[str]:
    """Normalise ``["tcp/5432", "UDP/53"]``; raises ValueError for anything else."""
    out = set()
    for item in expected:
        proto, _, port = item.strip().lower().partition("/")
        if proto not in ("tcp", "udp") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{item!r} is not tcp/PORT or udp/PORT")
        out.add(f"{proto}/{int(port)}")
    return out


def audit_ports(listeners: Iterable[Listener], ruleset: Ruleset | None, expected: Iterable[str], *,
                include_info: bool = False) -> dict[str, Finding]:
    """The port-audit findings by subject. ``listeners`` are non-loopback (see :func:`read_listeners`);
    ``ruleset`` is the one in force (None: nothing enforced yet, so nothing is exposed by a rule);
    ``expected`` are ``proto/port`` strings (the daemon adds its own mesh port)."""
    declared = parse_expected(expected)
    by_subject: dict[str, list[Listener]] = {}
    for x in listeners:
        if not x.is_loopback():
            by_subject.setdefault(x.subject, []).append(x)
    findings: dict[str, Finding] = {}
    for subject, group in sorted(by_subject.items()):
        if subject in declared:
            continue
        proto, port = group[0].proto, group[0].port
        processes = sorted({x.process for x in group})
        addresses = sorted({x.address for x in group})
        rules = exposing_rules(ruleset, proto, port, _families(group)) if ruleset is not None else []
        details = {"port": subject, "process": ", ".join(processes), "addresses": addresses}
        if rules:
            exposed = sorted({_describe(r) for r in rules})
            details["rules"] = exposed
            findings[subject] = Finding(
                CHECK, subject, "undeclared_listener", "warning",
                f"undeclared listener {subject} ({', '.join(processes)}) exposed by {exposed[0]}"
                + (f" and {len(exposed) - 1} more rule(s)" if len(exposed) > 1 else ""),
                details,
            )
        elif include_info:
            findings[subject] = Finding(CHECK, subject, "unexposed_listener", "info",
                                        f"listener {subject} ({', '.join(processes)}) is not exposed by any rule",
                                        details)
    for subject in sorted(declared - by_subject.keys()):
        findings[subject] = Finding(CHECK, subject, "missing_listener", "warning",
                                    f"declared service {subject} has nothing listening", {"port": subject})
    return findings
