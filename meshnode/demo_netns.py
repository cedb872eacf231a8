"""`meshctl demo --netns`: one network namespace per node, joined by veth pairs and a bridge, with real
nftables enforcement in every namespace (root only).

Addresses live only inside the namespaces this lab creates (10.213.0.0/24; the bridge, in the demo's own
namespace, is 10.213.0.1 and is where the operator connects from). A partition is a separate nftables
table (`pmdemo_fault`) in the partitioned namespaces that drops traffic to and from the other regions:
meshnode only ever replaces its own table, so the two coexist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .authority_store import CliError

SUBNET = "10.213.0"
BRIDGE_IP = f"{SUBNET}.1"
FAULT_TABLE = "pmdemo_fault"


def _run(argv: Sequence[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise CliError(f"{' '.join(argv[:6])} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc


LAB_ALIAS = "policymesh-lab"  # the bridge's alias: "policymesh-lab <owner pid> <owner start time>"


def _bridges() -> list[dict[str, Any]]:
    out = _run(["ip", "-j", "-d", "addr", "show", "type", "bridge"], check=False).stdout
    try:
        links = json.loads(out or b"[]")
    except ValueError:
        return []
    return [link for link in links if isinstance(link, dict)]


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout.decode(errors="replace")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[str]:
    return _run(["ip", "netns", "pids", ns], check=False).stdout.decode().split()


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid,
    it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]


def _owner(alias: str) -> tuple[int, str] | None:
    parts = alias.split()
    if len(parts) != 3 or parts[0] != LAB_ALIAS or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2]


def _alive(pid: int, start: str) -> bool:
    return _start_time(pid) == start


def _remove(namespaces: Sequence[str], bridge: str) -> None:
    """Kill what runs in ``namespaces``, delete them (their veth pairs go with them) and ``bridge``."""
    for ns in namespaces:
        for pid in _netns_pids(ns):
            _run(["kill", "-9", pid], check=False)
        _run(["ip", "netns", "delete", ns], check=False)
    _run(["ip", "link", "delete", bridge], check=False)


class NetnsLab:
    """``count`` namespaces ``{prefix}{tag}-{i}`` on one bridge (``{bridge_prefix}{tag}``) in the root
    namespace, addresses ``{subnet}.10+i``; the bridge is ``{subnet}.1``.  The chaos drill
    (``simulations/drill``) uses its own prefixes and subnet, so a drill and a demo can run at once."""

    def __init__(self, count: int, *, prefix: str = "pmdemo", bridge_prefix: str = "pmdbr", veth_prefix: str = "pmv",
                 subnet: str = SUBNET, what: str = "--netns") -> None:
        if os.geteuid() != 0:
            raise CliError(f"{what} needs root (network namespaces and nftables)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise CliError(f"{what} needs {tool} (install iproute2 and nftables)")
        self.tag = f"{os.getpid() % 100000}"
        self.prefix = prefix
        self.veth_prefix = veth_prefix
        self.subnet = subnet
        self.bridge_ip = f"{subnet}.1"
        self.bridge_prefix = bridge_prefix
        self.bridge = f"{bridge_prefix}{self.tag}"[:15]
        self.cleared: list[str] = []  # stale labs removed by setup (clear_stale)
        self.count = count
        self.namespaces: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.prefix}{self.tag}-{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def setup(self) -> None:
        """Build the lab, after removing what a killed lab left on our subnet (see ``clear_stale``; said
        on stderr)."""
        self.cleared = self.clear_stale()
        if self.cleared:
            sys.stderr.write(f"removed what a killed lab left behind: {', '.join(self.cleared)}\n")
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "alias", f"{LAB_ALIAS} {os.getpid()} {_start_time(os.getpid())}"])
        _run(["ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.count):
            ns = self.ns(i)
            host_if, ns_if = f"{self.veth_prefix}{self.tag}h{i}"[:15], f"{self.veth_prefix}{self.tag}n{i}"[:15]
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
            _run(["ip", "link", "set", ns_if, "netns", ns])
            _run(["ip", "link", "set", host_if, "master", self.bridge])
            _run(["ip", "link", "set", host_if, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", ns_if])
            _run(["ip", "-n", ns, "link", "set", ns_if, "up"])

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def cut(self, inside: Sequence[int], outside_ips: Sequence[str]) -> None:
        others = ", ".join(outside_ips)
        rules = (
            f"table inet {FAULT_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority -10; policy accept; ip saddr {{ {others} }} drop; }}\n"
            f"  chain out {{ type filter hook output priority -10; policy accept; ip daddr {{ {others} }} drop; }}\n"
            "}\n"
        )
        for i in inside:
            _run(["ip", "netns", "exec", self.ns(i), "nft", "-f", "-"], stdin=rules.encode())

    def heal(self, inside: Sequence[int]) -> None:
        for i in inside:
            _run(["ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "inet", FAULT_TABLE], check=False)

    def ruleset(self, i: int, table: str = "policymesh") -> str:
        proc = _run(["ip", "netns", "exec", self.ns(i), "nft", "list", "table", "inet", table], check=False)
        return proc.stdout.decode(errors="replace")

    def tcp_check(self, src: int, dst: int, port: int, timeout_s: float = 1.0) -> bool:
        """Open a real listener in ``dst`` and connect from ``src``: True when the connection is made."""
        listener = subprocess.Popen(
            self.exec_argv(dst, ["python3", "-c",
                                 "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
                                 "socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',int(sys.argv[1])));s.listen();"
                                 "print('up',flush=True);s.settimeout(5);c=s.accept()", str(port)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            assert listener.stdout is not None
            listener.stdout.readline()
            proc = _run(self.exec_argv(src, ["python3", "-c",
                                             "import socket,sys;socket.create_connection((sys.argv[1],int(sys.argv[2])),"
                                             "timeout=float(sys.argv[3]))", self.ip(dst), str(port), str(timeout_s)]),
                        check=False)
            return proc.returncode == 0
        finally:
            listener.kill()
            listener.wait()

    def teardown(self) -> None:
        _remove(self.namespaces, self.bridge)
        self.namespaces = []

    def clear_stale(self) -> list[str]:
        """Remove the labs a killed owner left behind (SIGKILL, a CI timeout: no teardown ran): their
        namespaces, the processes still running in them, their bridge.  A bridge left holding our
        subnet's address would take the operator's traffic to the new nodes, so the new lab could not
        work beside it.  A lab is stale when the process that built it (recorded in the bridge's alias)
        is gone; one whose owner still runs is live, and we refuse to start beside it.  Only bridges
        named with our prefix, or holding our bridge address, are looked at.  Returns what was removed."""
        namespaces = _netns_names()
        removed: list[str] = []
        for link in _bridges():
            name = str(link.get("ifname", ""))
            tag = name[len(self.bridge_prefix):] if name.startswith(self.bridge_prefix) else None
            holds = any(a.get("local") == self.bridge_ip for a in link.get("addr_info", ()))
            if name == self.bridge or (tag is None and not holds):
                continue
            nss = [ns for ns in namespaces if tag is not None and ns.startswith(f"{self.prefix}{tag}-")]
            owner = _owner(str(link.get("ifalias", "")))
            if owner is not None and _alive(*owner):
                if holds:
                    raise CliError(f"another lab is running on {self.subnet}.0/24 (bridge {name}, process {owner[0]}): "
                                   "stop it first")
                continue
            if owner is None and tag is None:
                raise CliError(f"bridge {name} holds {self.bridge_ip}, the lab's address, and is not a lab's: "
                               f"remove it (ip link delete {name}) or stop what uses it")
            if owner is None and any(_netns_pids(ns) for ns in nss):
                # built before labs recorded their owner: processes still run in it, so it may be live
                if holds:
                    raise CliError(f"another lab is running on {self.subnet}.0/24 (bridge {name}, namespaces "
                                   f"{self.prefix}{tag}-*): stop it first")
                continue
            _remove(nss, name)
            removed.append(f"{name} ({len(nss)} namespaces)")
        return removed
