"""A small network-namespace lab for the root-only enforcement tests.

``Lab(hosts=("a", "b", "c"))`` creates one namespace per host (``pmt-<random>-<host>``) plus one holding
a bridge; each host gets ``eth0`` (a veth whose peer is a bridge port) with a 10.x IPv4 and an fdxx
IPv6 address.  Nothing is configured in the root namespace.  ``down()`` kills the processes the lab
started (by pid) and deletes its namespaces; it is safe to call after a partial ``up()``.

Traffic is real: ``start_listener`` runs a TCP listener (a Python script) inside a namespace, and
``probe`` connects from another namespace, concurrently, with a short timeout, returning for each
target ``open``, ``refused`` (RST / ICMP reject), or ``timeout`` (dropped).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

LISTENER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(128)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            conn, _ = key.fileobj.accept()
        except OSError:
            continue
        try:
            conn.sendall(b"ok")
        except OSError:
            pass
        conn.close()
"""

PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1]); timeout = float(sys.argv[2])
def one(t):
    dst, port, src = t
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if src:
            s.bind((src, 0))
        s.connect((dst, port))
        return "open" if s.recv(2) == b"ok" else "open"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as exc:
        return "error:" + (exc.strerror or str(exc))
    finally:
        s.close()
with ThreadPoolExecutor(max_workers=max(1, len(targets))) as ex:
    print(json.dumps(list(ex.map(one, targets))))
"""


def skip_reason(*tools: str) -> str | None:
    """Why the root-only tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables/iptables)"
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def run(argv: list[str], stdin: bytes | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return proc


@dataclass
class Lab:
    hosts: tuple[str, ...] = ("a", "b", "c")
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    bridge: bool = True

    def __post_init__(self) -> None:
        rnd = secrets.randbelow(200) + 20
        self.prefix = f"pmt-{self.tag}"
        self.ns = {h: f"{self.prefix}-{h}" for h in self.hosts}
        self.bridge_ns = f"{self.prefix}-br"
        self.addr4 = {h: f"10.{rnd}.{len(self.hosts)}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.addr6 = {h: f"fd{rnd:02x}::{i + 1}" for i, h in enumerate(self.hosts)}
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ------------------------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.created.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def up(self) -> Lab:
        try:
            if self.bridge:
                self._add_ns(self.bridge_ns)
                run(["ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
                run(["ip", "-n", self.bridge_ns, "link", "set", "br0", "up"])
            for i, h in enumerate(self.hosts):
                ns = self.ns[h]
                self._add_ns(ns)
                if not self.bridge:
                    continue
                port = f"p{i}"
                run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                     "netns", self.bridge_ns])
                run(["ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up"])
                run(["ip", "-n", ns, "addr", "add", f"{self.addr4[h]}/24", "dev", "eth0"])
                run(["ip", "-n", ns, "addr", "add", f"{self.addr6[h]}/64", "dev", "eth0", "nodad"])
                run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        self.procs.clear()
        for name in reversed(self.created):
            run(["ip", "netns", "del", name], check=False)
        self.created.clear()

    # -- helpers --------------------------------------------------------------------------------------
    def exec(self, host: str, argv: list[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(["ip", "netns", "exec", self.ns[host], *argv], stdin=stdin, check=check)

    def add_address(self, host: str, addr: str) -> None:
        plen = "24" if ":" not in addr else "64"
        extra = ["nodad"] if ":" in addr else []
        run(["ip", "-n", self.ns[host], "addr", "add", f"{addr}/{plen}", "dev", "eth0", *extra])

    def reset_firewall(self, host: str) -> None:
        """Empty every firewall table in the host's namespace (the namespace is ours)."""
        self.exec(host, ["nft", "flush", "ruleset"])
        if shutil.which("ipset"):
            self.exec(host, ["ipset", "destroy"], check=False)

    def start_listener(self, host: str, ports: list[int]) -> None:
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[host], sys.executable, "-c", LISTENER, *map(str, ports)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"listener in {host} failed: {p.stderr.read().decode() if p.stderr else ''}")

    def probe(self, host: str, targets: list[tuple[str, int] | tuple[str, int, str | None]], timeout: float = 0.7) -> list[str]:
        norm = [[t[0], t[1], t[2] if len(t) > 2 else None] for t in targets]
        out = self.exec(host, [sys.executable, "-c", PROBE, json.dumps(norm), str(timeout)])
        return json.loads(out.stdout)


def lab_or_skip(*tools: str, hosts: tuple[str, ...] = ("a", "b", "c")) -> Lab:
    """A started lab of ``hosts``, or skip the test: a missing tool or no network namespaces here."""
    import pytest

    reason = skip_reason(*tools)
    if reason:
        pytest.skip(reason)
    lab = Lab(hosts=hosts)
    try:
        lab.up()
    except RuntimeError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    return lab
