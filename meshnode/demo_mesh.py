"""The demo's mesh: an authority, an operator and N real meshnode processes, started, queried, stopped.

`DemoMesh` sets everything up in one work directory (loopback addresses behind the demo's proxy, or
one network namespace per node with ``--netns``), starts and stops node processes, reads their status
and signs the next policy version. The tour that exercises it is `meshnode.demo.Demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from protocol.trust import parse_policy_toml

from .authority_store import AuthorityDir, CliError, read_key
from .client import OperatorError, publish, status
from .demo_netns import BRIDGE_IP, NetnsLab
from .demo_proxy import DemoNode
from .examples import sample_policy_toml
from .issuing import NodeSettings, enroll, init_authority, sign_next_policy

ROLES = ("web", "app", "db")
CONVERGE_TIMEOUT_S = 60.0
VALID_S = 30 * 86400
"""The demo authority's root and every demo certificate are valid for 30 days."""
POLICY_VALID_S = 7 * 86400
DEMO_GOSSIP_MS = {"sync_interval_ms": 1000, "cross_region_sync_interval_ms": 2000, "status_sync_interval_ms": 2000}
"""Demo timers: a small LAN, so probe and sync faster than the production defaults."""


class DemoMesh:
    """The processes and files of one demo mesh; no scripted steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.nodes < 2 or args.nodes > 200:
            raise CliError("--nodes must be 2..200")
        if args.regions < 1 or args.regions > args.nodes:
            raise CliError("--regions must be 1..nodes")
        self.lab: NetnsLab | None = NetnsLab(args.nodes) if args.netns else None
        self.args = args
        self.tmp = None
        if args.dir:
            self.dir = Path(args.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.tmp = tempfile.mkdtemp(prefix="policymesh-demo-")
            self.dir = Path(self.tmp)
        self.nodes: list[DemoNode] = []
        self.auth = AuthorityDir(self.dir / "authority")
        self.policy_key = self.auth.secrets / "policy-1-1.key"  # the demo's one policy key (root v1)
        self.enroll_key = self.auth.secrets / "enroll-1-1.key"  # and its one enroll key
        self.operator = self.dir / "operator"
        self.serial = 0
        self.steps: list[dict[str, Any]] = []

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        if not self.auth.exists():
            init_authority(self.auth.path, "demo", {"root": (1, 1), "policy": (1, 1), "enroll": (1, 1)},
                           int(time.time()), VALID_S)
        regions = [f"region-{chr(ord('a') + i)}" for i in range(a.regions)]
        for i in range(a.nodes):
            region = regions[i % a.regions]
            if self.lab is not None:
                ip, mesh, proxy, admin = self.lab.ip(i), 7946, 7946, 9946
            else:
                base = a.base_port + 10 * i
                ip, mesh, proxy, admin = f"127.0.0.{10 + i}", base + 1, base, base + 2
            node = DemoNode(i, f"node-{i + 1:02d}", region, ip, mesh, proxy, admin, self.dir / f"node-{i + 1:02d}")
            self.nodes.append(node)
        seeds_by_region: dict[str, DemoNode] = {}
        for n in self.nodes:
            seeds_by_region.setdefault(n.region, n)
        for n in self.nodes:
            seeds = [s.advertise for s in seeds_by_region.values() if s is not n]
            self._enroll(n, seeds)
        if not (self.operator / "node.cert").exists():
            self._enroll_operator()

    def _enroll(self, n: DemoNode, seeds: list[str]) -> None:
        if (n.dir / "node.cert").exists():
            return
        backend = "nftables" if self.lab is not None else "file"
        settings = NodeSettings(
            listen=n.direct, advertise=n.advertise, seeds=seeds, admin_listen=f"127.0.0.1:{n.admin_port}",
            backend=backend, allow_file_backend=self.lab is None,
            # Behind the demo's proxy a node dials from its own address, so the proxy can tell who is where.
            source_address=n.ip if self.lab is None else "",
            gossip=DEMO_GOSSIP_MS,
        )
        enroll(self.auth, node_id=n.node_id, region=n.region, roles=[ROLES[n.index % len(ROLES)]],
               addresses=[n.ip], out=n.dir, valid_s=VALID_S, now=int(time.time()), settings=settings,
               keys=[read_key(self.enroll_key)])

    def _enroll_operator(self) -> None:
        enroll(self.auth, node_id="operator-1", region="ops", roles=["operator"], addresses=[], out=self.operator,
               valid_s=VALID_S, now=int(time.time()), settings=None, keys=[read_key(self.enroll_key)])

    # -- processes --------------------------------------------------------------------------------
    def start_node(self, n: DemoNode) -> None:
        log = open(n.dir / "meshnode.log", "ab")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "meshnode.cli.meshnode", "run", "--config", str(n.dir / "node.toml")]
        if self.lab is not None:
            argv = self.lab.exec_argv(n.index, argv)
        n.proc = subprocess.Popen(
            argv,
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        log.close()

    def stop_node(self, n: DemoNode, sig: int = signal.SIGTERM) -> None:
        if n.proc is None or n.proc.poll() is not None:
            return
        n.proc.send_signal(sig)
        try:
            n.proc.wait(10)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait(5)

    def admin(self, n: DemoNode, path: str = "/v1/status") -> dict[str, Any] | None:
        if self.lab is not None:  # the admin listener is loopback inside the node's namespace
            try:
                return status(n.advertise, self.operator, timeout_s=3)
            except (OperatorError, CliError):
                return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.admin_port}{path}", timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_up(self, nodes: list[DemoNode], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(nodes)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if self.admin(n) is None]
            for n in pending:
                if n.proc is not None and n.proc.poll() is not None:
                    tail = (n.dir / "meshnode.log").read_text()[-2000:]
                    raise CliError(f"{n.node_id} exited at start (code {n.proc.returncode}); log tail:\n{tail}")
            time.sleep(max(0.1, self.poll_s))
        if pending:
            raise CliError(f"nodes not up after {timeout_s:.0f} s: {', '.join(n.node_id for n in pending)}")

    def wait_formed(self, timeout_s: float = 30.0) -> None:
        """Until every node knows every other member (their certificates fill each node's sets)."""
        ids = {n.node_id for n in self.nodes}
        deadline = time.monotonic() + timeout_s
        pending = list(self.nodes)
        while pending and time.monotonic() < deadline:
            still = []
            for n in pending:
                st = self.admin(n)
                seen = {m.get("node_id") for m in ((st or {}).get("cluster_view") or {}).get("members", [])}
                if not ids <= seen:
                    still.append(n)
            pending = still
            if pending:
                time.sleep(max(0.1, self.poll_s))
        if pending:
            self._say(f"  (membership still forming on {', '.join(n.node_id for n in pending)}; continuing)")

    def converged_view(self, n: DemoNode, timeout_s: float = 20.0) -> dict[str, Any]:
        """The cluster view as `meshctl status` shows it from one node, once member statuses (spread by
        gossip and anti-entropy) report the newest serial everywhere, or after ``timeout_s``."""
        self._say(f"  waiting for {n.node_id}'s gossiped view of the whole cluster ...")
        deadline = time.monotonic() + timeout_s
        while True:
            st = status(n.advertise, self.operator)
            conv = (st.get("cluster_view") or {}).get("convergence") or {}
            if conv.get("members") and conv.get("converged") == conv.get("members"):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.5)

    def enforced(self, n: DemoNode) -> int:
        st = self.admin(n)
        if st is None:
            return -1
        return int(st.get("enforcement", {}).get("applied_serial") or 0)

    # -- steps ------------------------------------------------------------------------------------
    def sign(self, extra_rule: str = "") -> bytes:
        if self.lab is not None:  # the operator reaches every node's mesh port from the bridge address
            extra_rule += (f'\n[[allow]]\nname = "operator-to-mesh"\nfrom = ["cidr:{BRIDGE_IP}/32"]\n'
                           'to = ["role:*"]\nports = ["tcp/7946"]\n')
        doc, rev = parse_policy_toml(sample_policy_toml() + extra_rule)
        signed = sign_next_policy(self.auth, doc, rev, now=int(time.time()), expires_s=POLICY_VALID_S,
                                  keys=[read_key(self.policy_key)])
        serial = self.serial = signed.version.serial
        data = signed.envelope
        (self.dir / f"policy-{serial}.msgpack").write_bytes(data)
        return data

    @property
    def poll_s(self) -> float:
        # In --netns mode every poll is an operator channel (a Noise handshake) from one address, which
        # the nodes' per-source handshake rate limit (20/s) would start refusing if polled faster.
        return 0.25 if self.lab is not None else 0.02

    def _publish(self, via: DemoNode, data: bytes) -> dict[str, Any]:
        for attempt in range(5):
            try:
                return publish(via.advertise, self.operator, data, timeout_s=20)
            except OperatorError as exc:
                if "429" not in str(exc) or attempt == 4:
                    raise
                time.sleep(1.0 + attempt)  # rate limited: wait for the bucket to refill
        raise AssertionError("unreachable")

    def _say(self, text: str) -> None:
        print(text, flush=True)

