"""Real `meshnode` processes on loopback for the daemon tests and the daemon benchmark.

A `Cluster` is one authority (`meshctl authority init`), an operator identity and any number of
enrolled nodes, each a real `meshnode run` process with its own loopback address (127.x.y.z), the
`file` enforcement backend (the labelled override) and its admin listener on its own address. Nothing
is mocked: the only way in is the nodes' mesh and admin ports.

Every cluster takes a distinct `subnet` (the third octet of its addresses) and derives its ports from
it, so clusters in one run never share an address. Taken: tests/test_daemon.py 1, 11-15, 20-23;
tests/test_daemon_rotation.py 40; tests/test_daemon_reload.py 41; tests/bench_daemon.py 60;
tests/test_large_policy.py 70; tests/test_daemon_resilience.py 71-72; tests/test_rogue_peer.py 73-74;
tests/test_systemd.py 80-81; tests/test_daemon_alerts.py 90-94; tests/test_validate_netns.py 96 (authority only:
its nodes live in network namespaces); tests/test_daemon_validation.py 97; tests/test_daemon_member_bounds.py 150;
tests/test_daemon_publish.py 170; tests/test_daemon_datagrams.py 171 (172 inside a namespace); tests/test_daemon_record_refs.py 177;
tests/bench_lossy.py 175 (inside a namespace); tests/test_port_scan_netns.py 123 (authority only, like
test_validate_netns.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from meshnode.cli.meshctl import main as meshctl_main
from meshnode.config import render_config
from meshnode.examples import sample_policy_toml

VENV_BIN = Path(sys.executable).parent
MESHNODE = [sys.executable, "-m", "meshnode.cli.meshnode"]
MESHCTL = [sys.executable, "-m", "meshnode.cli"]
ROLES = ("web", "app", "db")
BASE_PORT = 24600  # this module's ports: 24600 + 24 * subnet + 2 * index (mesh), +1 (admin)
START_TIMEOUT_S = 30.0
CONVERGE_TIMEOUT_S = 40.0

# The sample policy (web -> app:8080, app -> db:5432), which the demo publishes too.
BASE_POLICY = sample_policy_toml()


def meshctl(*args: str) -> None:
    """Run a meshctl command in-process (fast); raise when it fails."""
    with contextlib.redirect_stdout(_Sink()):
        rc = meshctl_main([str(a) for a in args])
    if rc != 0:
        raise AssertionError(f"meshctl {' '.join(args)} exited {rc}")


class _Sink:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `pred` until it returns a truthy value; fail with `what` after `timeout_s` (only a guard
    against hanging: tests assert behaviour, never speed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric_sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@dataclass(eq=False)
class NodeProc:
    node_id: str
    region: str
    role: str
    ip: str
    mesh_port: int
    admin_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    nofile: int | None = None  # start with this soft RLIMIT_NOFILE (descriptor pressure tests)
    wrapper: list[str] = field(default_factory=list)  # run under this prefix (e.g. ip netns exec NS)

    @property
    def mesh(self) -> str:
        return f"{self.ip}:{self.mesh_port}"

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "meshnode.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.node_id} is already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        nofile = self.nofile

        def limit_fds() -> None:
            if nofile is not None:
                import resource

                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.proc = subprocess.Popen(
            [*self.wrapper, *MESHNODE, "run", "--config", str(self.config)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=limit_fds if nofile is not None else None,
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal the process and wait; SIGKILL it if it does not exit. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # -- admin listener ----------------------------------------------------------------------------
    def admin(self, path: str, timeout_s: float = 3.0) -> tuple[int, str] | None:
        url = f"http://{self.ip}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError, TimeoutError):
            return None

    def status(self) -> dict[str, Any] | None:
        got = self.admin("/v1/status")
        if got is None or got[0] != 200:
            return None
        return json.loads(got[1])

    def applied_serial(self) -> int:
        st = self.status()
        return -1 if st is None else int(st["enforcement"]["applied_serial"] or 0)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        got = self.admin("/metrics")
        assert got is not None and got[0] == 200, f"{self.node_id}: /metrics unavailable"
        return parse_metrics(got[1])

    def wait_up(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.node_id} exited (code {self.proc.returncode}):\n{self.log_text()[-3000:]}")
            return self.admin("/healthz") is not None

        wait_until(up, timeout_s, f"{self.node_id} admin listener")

    def alive_members(self) -> set[str]:
        st = self.status()
        if st is None:
            return set()
        return {m["node_id"] for m in st["cluster_view"]["members"] if m["liveness"] == "alive"}


class Cluster:
    """One authority, one operator, enrolled nodes as real processes; `close()` kills them all."""

    def __init__(self, root: Path, subnet: int, *, cluster: str = "testmesh", skew_s: int = 1,
                 gossip: dict[str, int] | None = None) -> None:
        assert 1 <= subnet <= 200
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.subnet = subnet
        self.name = cluster
        self.skew_s = skew_s
        self.gossip = gossip if gossip is not None else {"sync_interval_ms": 1000, "cross_region_sync_interval_ms": 2000}
        self.authority = self.root / "authority"
        self.operator = self.root / "operator"
        self.nodes: list[NodeProc] = []
        self._index = 0
        meshctl("authority", "init", self.authority, "--cluster", cluster)
        meshctl("node", "enroll", "--authority", self.authority, "--node-id", "operator-1", "--region", "ops",
                "--role", "operator", "--out", self.operator, "--valid", "1d", *self.key_args("enroll"))

    # -- nodes -------------------------------------------------------------------------------------
    def ip(self, index: int) -> str:
        return f"127.66.{self.subnet}.{index + 1}"

    def add_node(
        self,
        node_id: str,
        region: str,
        *,
        role: str | None = None,
        seeds: Iterable[NodeProc | str] | None = None,
        valid: str = "1d",
        sources: str = "",
        mesh_extra: str = "",
        start: bool = False,
    ) -> NodeProc:
        i = self._index
        self._index += 1
        assert i < 12, "12 nodes per subnet (ports)"
        ip = self.ip(i)
        port = BASE_PORT + 24 * self.subnet + 2 * i
        role = role or ROLES[i % len(ROLES)]
        d = self.root / node_id
        meshctl("node", "enroll", "--authority", self.authority, "--node-id", node_id, "--region", region,
                "--role", role, "--address", ip, "--out", d, "--backend", "file", "--valid", valid,
                *self.key_args("enroll"))
        if seeds is None:
            # One seed per region among the nodes already added (like the demo).
            by_region: dict[str, NodeProc] = {}
            for n in self.nodes:
                by_region.setdefault(n.region, n)
            seeds = list(by_region.values())
        seed_addrs = [s.mesh if isinstance(s, NodeProc) else s for s in seeds]
        node = NodeProc(node_id, region, role, ip, port, port + 1, d)
        self.write_config(node, seed_addrs, sources=sources, mesh_extra=mesh_extra)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def write_config(self, node: NodeProc, seeds: list[str], *, sources: str = "", mesh_extra: str = "") -> None:
        text = render_config(
            cluster=self.name, node_id=node.node_id, region=node.region, listen=node.mesh, advertise=node.mesh,
            seeds=seeds, admin_listen=f"{node.ip}:{node.admin_port}", backend="file", allow_file_backend=True,
        )
        text = text.replace("clock_skew_s = 300", f"clock_skew_s = {self.skew_s}")
        text = text.replace(f'advertise = "{node.mesh}"',
                            f'advertise = "{node.mesh}"\nsource_address = "{node.ip}"' + mesh_extra)
        if sources:
            text = re.sub(r"^drop_dir = .*$", sources, text, count=1, flags=re.M)
        if self.gossip:
            text += "\n[gossip]\n" + "".join(f"{k} = {v}\n" for k, v in self.gossip.items())
        node.config.write_text(text)

    def start(self, nodes: Iterable[NodeProc] | None = None) -> None:
        nodes = list(self.nodes if nodes is None else nodes)
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_up()

    def wait_members(self, nodes: list[NodeProc] | None = None, timeout_s: float = CONVERGE_TIMEOUT_S) -> None:
        """Until every node sees every other as alive."""
        nodes = self.nodes if nodes is None else nodes
        ids = {n.node_id for n in nodes}
        try:
            wait_until(lambda: all(ids <= n.alive_members() for n in nodes), timeout_s,
                       f"membership of {sorted(ids)}", interval_s=0.2)
        except AssertionError:
            missing = {n.node_id: sorted(ids - n.alive_members()) for n in nodes}
            raise AssertionError(f"membership incomplete after {timeout_s:.0f} s; each node misses: {missing}") from None

    def close(self) -> None:
        for n in self.nodes:
            if n.alive:
                n.stop(signal.SIGKILL, timeout_s=5)

    # -- policies ----------------------------------------------------------------------------------
    def key_args(self, role: str = "policy") -> list[str]:
        """``--key FILE`` for each key the authority's current root lists for ``role`` (signing names its keys)."""
        from meshnode.authority_store import AuthorityDir
        from meshnode.keyfile import key_header

        authority = AuthorityDir(self.authority)
        wanted = set(authority.root().roles[role].keyids)
        paths = [p for p in authority.key_paths() if key_header(p).get("key_id") in wanted]
        return [a for p in paths for a in ("--key", str(p))]

    def sign(self, extra: str = "", *, expires: str = "1d", name: str | None = None) -> tuple[int, bytes]:
        """Sign BASE_POLICY + `extra` with `meshctl policy sign`; returns (serial, envelope bytes)."""
        d = self.root / "policies"
        d.mkdir(exist_ok=True)
        k = len(list(d.glob("*.toml"))) + 1
        toml = d / f"{name or f'p{k}'}.toml"
        toml.write_text(BASE_POLICY + f'\n[[allow]]\nname = "step-{k}"\nfrom = ["role:web"]\nto = ["role:web"]\n'
                        f'ports = ["tcp/{9000 + k}"]\n' + extra)
        out = toml.with_suffix(".msgpack")
        meshctl("policy", "sign", toml, "--authority", self.authority, *self.key_args(), "--expires", expires,
                "--out", out)
        data = out.read_bytes()
        return _serial_of(data), data

    def sign_toml(self, toml_text: str, name: str, *, expires: str = "1d") -> tuple[int, Path]:
        """Sign a complete policy document with `meshctl policy sign`; returns (serial, envelope file)."""
        d = self.root / "policies"
        d.mkdir(exist_ok=True)
        toml = d / f"{name}.toml"
        toml.write_text(toml_text)
        out = toml.with_suffix(".msgpack")
        meshctl("policy", "sign", toml, "--authority", self.authority, *self.key_args(), "--expires", expires,
                "--out", out)
        return _serial_of(out.read_bytes()), out

    def publish(self, via: NodeProc, data: bytes, timeout_s: float = 20.0) -> dict[str, Any]:
        from meshnode.client import publish

        return publish(via.mesh, self.operator, data, timeout_s=timeout_s)

    def wait_serial(self, serial: int, nodes: list[NodeProc] | None = None,
                    timeout_s: float = CONVERGE_TIMEOUT_S) -> None:
        nodes = self.nodes if nodes is None else nodes

        def done() -> bool:
            return all(n.applied_serial() >= serial for n in nodes)

        try:
            wait_until(done, timeout_s, f"serial {serial} on {[n.node_id for n in nodes]}", interval_s=0.05)
        except AssertionError:
            got = {n.node_id: n.applied_serial() for n in nodes}
            raise AssertionError(f"serial {serial} not applied everywhere: {got}") from None


def bulk_rules(n: int, *, prefix: str = "bulk") -> str:
    """`n` distinct allow rules in policy TOML (each with a role and a CIDR source and its own port)."""
    return "".join(
        f'\n[[allow]]\nname = "{prefix}-{i:04d}"\nfrom = ["role:app", "cidr:10.{i // 256}.{i % 256}.0/24"]\n'
        f'to = ["role:db"]\nports = ["tcp/{10000 + i}"]\n'
        for i in range(n)
    )


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def run_cli(args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command line (meshctl / meshnode) as a real process."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


# -- hostile peers --------------------------------------------------------------------------------


async def raw_ws_send(target: str, messages: list[bytes | str], *, wait_s: float = 5.0) -> list[Any]:
    """Open a plain WebSocket to a node's /mesh, send `messages` (bytes as binary, str as text) and
    collect what comes back until the node closes the socket."""
    got: list[Any] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://{target}/mesh", max_msg_size=0) as ws:
            for m in messages:
                if isinstance(m, str):
                    await ws.send_str(m)
                else:
                    await ws.send_bytes(m)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                got.append(msg)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.ERROR):
                    break
    return got


async def open_session(target: str, identity_dir: Path, *, anchor_dir: Path | None = None):
    """Handshake with a node as the node or operator enrolled in `identity_dir` (a real peer, with
    real keys). Returns (ws, session, http) on success; raises the handshake's error otherwise."""
    from meshnode import transport
    from meshnode.identity import load_identity_dir
    from protocol.channel import ConnectionKind, SecureSession
    from protocol.trust import TrustedState

    ident = load_identity_dir(identity_dir)
    trust = TrustedState(load_identity_dir(anchor_dir).anchor if anchor_dir else ident.anchor)
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(f"http://{target}/mesh", max_msg_size=0)
        kind = ConnectionKind.OPERATOR if "operator" in ident.cert.roles else ConnectionKind.GOSSIP
        session = SecureSession(initiator=True, trust=trust, static_private=ident.static_private,
                                certificate=ident.cert_bytes, entropy=transport.entropy,
                                now_ms=transport.now_ms(), accept=frozenset({kind}))
        conn = transport.Conn(ws=ws, session=session, inbound=False, address=target)
        await asyncio.wait_for(transport.handshake(conn, lambda d, n: None), 10)
    except BaseException:
        await http.close()
        raise
    return ws, session, http


async def send_as(target: str, identity_dir: Path, messages: list[bytes]) -> None:
    """Open a session as the peer enrolled in ``identity_dir``, send ``messages`` (framed by the session)
    and close it a second later."""
    ws, session, http = await open_session(target, identity_dir)
    try:
        for m in messages:
            for frame in session.send_message(m):
                await ws.send_bytes(frame)
        await asyncio.sleep(1.0)
    finally:
        await ws.close()
        await http.close()


def _serial_of(envelope: bytes) -> int:
    """The serial a signed policy file claims (unverified: for naming what a test published)."""
    from protocol.trust import decode_envelope, decode_policy

    return decode_policy(decode_envelope(envelope, "policy").payload).serial
