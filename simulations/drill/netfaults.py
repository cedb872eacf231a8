"""What the real drill does to the namespaces and processes of its lab (root only).

* ``DrillTable``: the drill's own nftables table (``inet pmdrill``) in each namespace, rebuilt whole in
  one transaction on every change: packet loss (``numgen random mod 100 < P drop`` on input from the
  other nodes; the bridge, where the drill itself talks from, is exempt), partitions (a set of peer
  addresses dropped both ways) and blackholes (a region outage: nothing in or out but loopback).
  meshnode only ever replaces its own table (``policymesh``), so the two coexist.
* ``KernelWatch``: ``nft monitor`` in a namespace; reports each gap in which our table was gone
  (deleted or flushed, then added back) to the checker, so a gap shorter than the sampling is caught.
* ``enter_netns``: moves the calling *thread* into a namespace (``setns``), so a sampler thread talks
  to the node's loopback admin listener and runs ``nft`` there without a process per request.
* ``DiskFiller`` (a tmpfs on a node's state directory, filled to ENOSPC and emptied again),
  ``set_nofile`` (``prlimit`` on the running process), ``AlertReceiver`` (the alert webhook, on the
  bridge address).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TABLE = "pmdrill"
NODE_TABLE = "policymesh"
CLONE_NEWNET = 0x40000000
GAP_RESOLUTION_MS = 25
"""``nft monitor`` prints an atomic replace (our apply: delete and add in one transaction) as two lines
read within microseconds; a delete followed by an add later than this is a gap."""


def run(argv: list[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread that entered namespace ``name`` (this one stays where it is); its result, or
    its exception raised here."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            enter_netns(name)
            box["v"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            box["e"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


class DrillTable:
    """The drill's table in one namespace: loss, cut peers, blackhole."""

    def __init__(self, ns: str, bridge_ip: str) -> None:
        self.ns = ns
        self.bridge_ip = bridge_ip
        self.loss_pct = 0
        self.cut: set[str] = set()
        self.blackhole = False

    def text(self) -> str:
        rules_in = ['iifname "lo" accept']
        rules_out = ['oifname "lo" accept']
        if self.blackhole:
            rules_in.append("drop")
            rules_out.append("drop")
        if self.cut:
            peers = ", ".join(sorted(self.cut))
            rules_in.append(f"ip saddr {{ {peers} }} drop")
            rules_out.append(f"ip daddr {{ {peers} }} drop")
        rules_in.append(f"ip saddr {self.bridge_ip} accept")
        if self.loss_pct:
            rules_in.append(f"numgen random mod 100 < {self.loss_pct} drop")
        chain_in = "".join(f"    {r}\n" for r in rules_in)
        chain_out = "".join(f"    {r}\n" for r in rules_out)
        return (f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"
                f"  chain in {{\n    type filter hook input priority -10; policy accept;\n{chain_in}  }}\n"
                f"  chain out {{\n    type filter hook output priority -10; policy accept;\n{chain_out}  }}\n}}\n")

    def load(self) -> None:
        run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], stdin=self.text().encode())


class KernelWatch:
    """``nft monitor`` in one namespace: ``on_gap(start_ms, end_ms)`` for each gap in our table."""

    def __init__(self, ns: str, now_ms: Callable[[], int], on_gap: Callable[[int, int], None]) -> None:
        self.ns = ns
        self.now_ms = now_ms
        self.on_gap = on_gap
        self.lines = 0
        self.gone_since: int | None = None
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor", "ruleset"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._read, name=f"nft-monitor-{ns}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            words = raw.decode(errors="replace").split()
            self.lines += 1
            t = self.now_ms()
            if words[:2] == ["flush", "ruleset"] or (words[:2] == ["delete", "table"] and words[3:4] == [NODE_TABLE]):
                if self.gone_since is None:
                    self.gone_since = t
            elif words[:2] == ["add", "table"] and words[3:4] == [NODE_TABLE] and self.gone_since is not None:
                if t - self.gone_since > GAP_RESOLUTION_MS:
                    self.on_gap(self.gone_since, t)
                self.gone_since = None

    def gap_open_since(self) -> int | None:
        return self.gone_since

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.thread.join(5)


class DiskFiller:
    """A small tmpfs mounted on a node's state directory (before the node starts); ``fill`` writes a
    file until the filesystem is full (ENOSPC), ``empty`` removes it."""

    SIZE = "8m"

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.filler = state_dir / ".drill-disk-full"
        self.mounted = False

    def mount(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=0700", "tmpfs", str(self.dir)])
        self.mounted = True

    def fill(self) -> int:
        written = 0
        chunk = b"\0" * 65536
        with open(self.filler, "wb") as f:
            try:
                while True:
                    written += f.write(chunk)
                    f.flush()
            except OSError:
                pass
        with contextlib.suppress(OSError), open(self.dir / ".drill-disk-full-2", "wb") as f2:
            f2.write(b"\0" * 512)  # the last partial block
        return written

    def empty(self) -> None:
        for p in (self.filler, self.dir / ".drill-disk-full-2"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def unmount(self) -> None:
        if self.mounted:
            run(["umount", "-l", str(self.dir)], check=False)
            self.mounted = False


def get_nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return int(parts[3]), int(parts[4])
    raise RuntimeError(f"no open-files limit for pid {pid}")


def set_nofile(pid: int, soft: int, hard: int) -> None:
    run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"])


class AlertReceiver:
    """The alert webhook every drill node posts to: ``on_alert(node_id, check, action)`` per event."""

    def __init__(self, host: str, on_alert: Callable[[str, str, str], None]) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                try:
                    body = json.loads(self.rfile.read(length))
                    received.append(body)
                    on_alert(str(body["node"]), str(body["check"]), str(body["action"]))
                    self.send_response(202)
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, name="alert-receiver", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True
