"""`meshctl demo --netns`: one network namespace per node, joined by veth pairs and a bridge, with real
nftables enforcement in every namespace (root only).

Addresses live only inside the namespaces this lab creates (10.213.0.0/24; the bridge, in the demo's own
namespace, is 10.213.0.1 and is where the operator connects from). A partition is a separate nftables
table (`pmdemo_fault`) in the partitioned namespaces that drops traffic to and from the other regions:
meshnode only ever replaces its own table, so the two coexist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from .authority_store import CliError

SUBNET = "10.213.0"
BRIDGE_IP = f"{SUBNET}.1"
FAULT_TABLE = "pmdemo_fault"


def _run(argv: Sequence[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise CliError(f"{' '.join(argv[:6])} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc


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
        self.bridge = f"{bridge_prefix}{self.tag}"[:15]
        self.count = count
        self.namespaces: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.prefix}{self.tag}-{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def setup(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
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
        for ns in self.namespaces:
            _run(["ip", "netns", "pids", ns], check=False)
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                _run(["kill", "-9", pid.decode()], check=False)
            _run(["ip", "netns", "delete", ns], check=False)
        _run(["ip", "link", "delete", self.bridge], check=False)
        self.namespaces = []
