"""Real Serf agents (Debian's ``serf``) in the drill's namespaces: the peer policymesh is measured against.

One agent per node, started inside the node's network namespace and bound to its address, so Serf's
gossip crosses the same veths, bridge and nftables loss rules as the daemons' traffic.  A user event
fired through one agent's RPC stands for a published policy version; every agent runs an event
handler that appends ``<payload> <wall ns>`` to its own file, so "publish -> every node has it" is
measured the same way as for meshnode (the receivers' own clock, the host's, one clock for all).

This is a benchmark baseline, not part of the product: nothing here runs unless a benchmark asks.
The agents use Serf's defaults (LAN profile) apart from the addresses and the handler.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERF_PORT = 7950
RPC_PORT = 7373
HANDLER = """#!/bin/sh
payload=$(cat)
echo "$payload $(date +%s%N)" >> "$1"
"""


class SerfUnavailableError(RuntimeError):
    pass


def serf_binary() -> str:
    """Debian's serf, installed on first use when apt is there (benchmarks run as root)."""
    path = shutil.which("serf")
    if path is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "serf"], capture_output=True, check=False, timeout=600)
        path = shutil.which("serf")
    if path is None:
        raise SerfUnavailableError("serf is not installed (apt-get install serf)")
    return path


@dataclass
class SerfAgents:
    """``count`` agents; ``exec_argv(i, argv)`` runs argv in node i's namespace, ``ip(i)`` is its address."""

    count: int
    exec_argv: Callable[[int, Sequence[str]], list[str]]
    ip: Callable[[int], str]
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, settle_s: float = 2.0) -> None:
        serf = serf_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        handler = self.workdir / "handler.sh"
        handler.write_text(HANDLER)
        handler.chmod(0o755)
        for i in range(self.count):
            out = self.received_file(i)
            out.write_text("")
            argv = [serf, "agent", f"-node=serf-{i}", f"-bind={self.ip(i)}:{SERF_PORT}",
                    f"-rpc-addr=127.0.0.1:{RPC_PORT}", f"-event-handler=user={handler} {out}",
                    "-log-level=warn"]
            log = open(self.workdir / f"agent-{i}.log", "wb")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen(self.exec_argv(i, argv), stdout=log, stderr=log,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()
        time.sleep(settle_s)
        for i in range(1, self.count):
            self._rpc(i, ["join", f"{self.ip(0)}:{SERF_PORT}"])

    def received_file(self, i: int) -> Path:
        return self.workdir / f"received-{i}.txt"

    def _rpc(self, i: int, args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        argv = self.exec_argv(i, [serf_binary(), *args[:1], f"-rpc-addr=127.0.0.1:{RPC_PORT}", *args[1:]])
        return subprocess.run(argv, capture_output=True, timeout=30, check=False)

    def alive_members(self, i: int = 0) -> int:
        out = self._rpc(i, ["members", "-status=alive"]).stdout.decode(errors="replace")
        return sum(1 for line in out.splitlines() if line.strip())

    def wait_formed(self, timeout_s: float = 60.0) -> bool:
        """Until every agent has joined (it sees another member) and agent 0 sees at least 80% alive (on a
        loaded host under loss, Serf's members flap between suspect and alive); an agent whose join was
        lost (a dropped SYN outlasts ``serf join``'s timeout) joins again."""
        deadline = time.monotonic() + timeout_s
        joined = {0}
        while time.monotonic() < deadline:
            for i in range(1, self.count):
                if i not in joined:
                    if self.alive_members(i) >= 2:
                        joined.add(i)
                    else:  # several seeds: any one that answers will do
                        seeds = sorted(joined)[:3]
                        self._rpc(i, ["join", *(f"{self.ip(s)}:{SERF_PORT}" for s in seeds)])
            if len(joined) == self.count and self.alive_members() >= 0.8 * self.count:
                return True
            time.sleep(1.0)
        return False

    def fire(self, via: int, payload: str) -> float:
        """Fire a user event through agent ``via``; returns the wall time (s) just before the RPC."""
        t0 = time.time()
        self._rpc(via, ["event", "-coalesce=false", "policy", payload])
        return t0

    def delivered(self, payload: str) -> dict[int, float]:
        """Agent index -> wall time (s) its handler ran for ``payload`` (first delivery only)."""
        got: dict[int, float] = {}
        for i in range(self.count):
            with contextlib.suppress(OSError):
                for line in self.received_file(i).read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == payload and i not in got:
                        got[i] = int(parts[1]) / 1e9
        return got

    def wait_delivered(self, payload: str, timeout_s: float) -> dict[int, float]:
        deadline = time.monotonic() + timeout_s
        got = self.delivered(payload)
        while len(got) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.delivered(payload)
        return got

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs = []
