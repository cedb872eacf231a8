"""The real drill's cluster: an authority, an operator and ``n`` enrolled nodes, each a real ``meshnode
run`` process in its own network namespace with the nftables backend; signing and publishing go
through ``meshctl`` as an operator would.

Node ``i`` is ``n{i:05d}`` (as in the simulator), in region ``regions[i % len(regions)]``, with the role
``svc{i % 29}`` (the simulator's policy document targets those roles), the first node of each region a
seed.  The gossip timers are the scenario's ``[gossip]`` (the simulator runs the same configuration).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.authority_store import AuthorityDir, read_key
from meshnode.issuing import NodeSettings, enroll, init_authority

MESH_PORT = 7946
ADMIN_PORT = 9946
VALID_S = 7 * 86400


@dataclass(eq=False)
class RealNode:
    index: int
    node_id: str
    region: str
    ip: str
    ns: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    skew_s: float = 0.0  # started under faketime with this offset (clock_skew)
    starts: int = 0
    kills: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mesh(self) -> str:
        return f"{self.ip}:{MESH_PORT}"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.node_id} is already running"
        argv = [sys.executable, "-m", "meshnode.cli.meshnode", "run", "--config", str(self.dir / "node.toml")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.skew_s:
            # libfaketime (apt: faketime): only the wall clock moves; monotonic time stays real
            argv = ["faketime", "-f", f"{self.skew_s:+.0f}s", *argv]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        log = open(self.dir / "meshnode.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self.starts += 1

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def stop(self) -> None:
        """SIGTERM (a graceful stop), SIGKILL after 15 s."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class RealCluster:
    def __init__(self, root: Path, lab: Any, n: int, regions: list[str], gossip: dict[str, int],
                 webhook_url: str) -> None:
        self.root = root
        self.lab = lab
        self.auth = AuthorityDir(root / "authority")
        self.operator = root / "operator"
        now = int(time.time())
        init_authority(self.auth.path, "drill", {"root": (1, 1), "policy": (1, 1), "enroll": (1, 1)}, now, VALID_S)
        enroll_key = [read_key(self.auth.secrets / "enroll-1-1.key")]
        self.policy_key = self.auth.secrets / "policy-1-1.key"
        self.nodes: list[RealNode] = []
        for i in range(n):
            region = regions[i % len(regions)]
            self.nodes.append(RealNode(i, f"n{i:05d}", region, lab.ip(i), lab.ns(i), root / f"n{i:05d}"))
        seeds: dict[str, RealNode] = {}
        for node in self.nodes:
            seeds.setdefault(node.region, node)
        for node in self.nodes:
            settings = NodeSettings(listen=f"0.0.0.0:{MESH_PORT}", advertise=node.mesh,
                                    seeds=[s.mesh for s in seeds.values() if s is not node],
                                    admin_listen=f"127.0.0.1:{ADMIN_PORT}", backend="nftables", gossip=dict(gossip))
            enroll(self.auth, node_id=node.node_id, region=node.region, roles=[f"svc{node.index % 29}"],
                   addresses=[node.ip], out=node.dir, valid_s=VALID_S, now=now, settings=settings, keys=enroll_key)
            cfg = node.dir / "node.toml"
            cfg.write_text(cfg.read_text() + f'\n[alerts]\nwebhook_urls = ["{webhook_url}"]\n')
        enroll(self.auth, node_id="operator-1", region="ops", roles=["operator"], addresses=[], out=self.operator,
               valid_s=VALID_S, now=now, settings=None, keys=enroll_key)

    def sign(self, doc_toml: Path, serial: int) -> Path:
        out = doc_toml.with_name(f"policy-{serial}.msgpack")
        meshctl("policy", "sign", str(doc_toml), "--authority", str(self.auth.path), "--key", str(self.policy_key),
                "--serial", str(serial), "--expires", "7d", "--out", str(out))
        return out

    def publish(self, node: RealNode, envelope: Path, timeout_s: float = 20.0) -> tuple[bool, str]:
        """``meshctl policy publish``; (acknowledged, what it said)."""
        proc = subprocess.run([sys.executable, "-m", "meshnode.cli", "policy", "publish", str(envelope),
                               "--node", node.mesh, "--identity", str(self.operator)],
                              capture_output=True, text=True, timeout=timeout_s + 10, stdin=subprocess.DEVNULL)
        return proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-300:]

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                node.kill9()


def meshctl(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"meshctl {' '.join(args[:2])} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def admin_status(timeout_s: float = 1.5) -> dict[str, Any] | None:
    """``/v1/status`` of the node in the calling thread's namespace (see ``netfaults.enter_netns``)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/v1/status", timeout=timeout_s) as resp:
            return dict(json.loads(resp.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None
