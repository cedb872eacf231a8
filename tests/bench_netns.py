"""Real daemons in network namespaces under kernel packet loss, against real Serf in the same namespaces.

    sudo .venv/bin/python tests/bench_netns.py [--sizes 12,50,100] [--loss 0,10] [--publishes 6]
                                                [--regions 3] [--idle-s 10] [--no-serf] [--changing-rules]
                                                [--timeline] [--gossip NAME=INT] [--json FILE]

Built on the chaos drill's real mode (``simulations/drill``): one network namespace per node on a bridge
(``NetnsLab``), every node a real ``meshnode run`` with nftables enforcement (``RealCluster``), random
kernel packet loss on every node's input from the other nodes (``DrillTable``: nftables ``numgen random
mod 100 < P drop``).  The kernel cannot delay here (no ``tc netem``): regions are only names, latency is
the bridge's.  For each size and loss:

1. meshnode: every node up and enforcing serial 1, then ``--publishes`` versions, each through a node
   drawn from a seeded generator, published from inside that node's namespace (as ``serf event`` is
   fired at a local agent); per version, the time from the start of the publish to the last node logging
   ``policy.applied`` for it (the nodes' own log timestamps: one host clock; "applied" is the kernel
   holding the version's ruleset: its ``nft`` transaction committed), the operator's acknowledgement,
   and how many nodes got it.  Each version's time is split into the publish hop (start -> first node
   stored it: ``policy.accepted``), in the mesh (first stored -> last applied) and on each node (stored
   -> applied: render and ``nft`` load).  By default every version is the same document with a new
   serial (a node's ruleset need not change); ``--changing-rules`` adds a rule per version that every
   node enforces (a full ``nft`` load on every node).  The versions are published with the client
   library from inside the node's namespace; one more version goes through the ``meshctl`` CLI (its
   Python start-up included) and is reported on its own line.  Then an idle window: CPU per daemon (utime+stime from
   /proc, % of one core) and RSS.  The daemons' CPU seconds during the publishes say how much of the
   time is the 2-core host's contention.
2. Serf, run first in the same namespaces (Debian's ``serf``, ``simulations/drill/serf_agents.py``): one agent per namespace, the same loss
   rules; ``--publishes`` user events, each fired through a seeded agent; per event the time from firing
   (the ``serf event`` client's start included) to the last agent's handler run.
4. The simulator on the same topology (``predict``): its median next to the measured one, from the
   ``netns-12`` scenario (the daemon's transport, ``mixed``: small dissemination messages as acknowledged
   datagrams, the rest on TCP; the daemons sharing the host's 2 cores) and, for comparison, from
   ``loopback-12`` (every message on TCP, a CPU per node: the older prediction).  ``--predict-only``
   prints the predictions alone (no root, no namespaces).
3. Kernel counters summed over the namespaces during each side's publishes (TCP segments sent and
   retransmitted and why, UDP datagrams), the daemons' datagram counters (sent, retransmits, fallbacks
   to the stream, fragmented bodies), and CPU seconds per version: the daemons, the daemons with their
   ``nft`` children, and the whole host (other users of the 2 cores included).

Prints per-version figures, the medians, p99, max, delivery completeness and the policymesh/Serf ratio
of medians.  A benchmark (root only), not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.client import publish  # noqa: E402
from meshnode.demo_netns import NetnsLab  # noqa: E402
from simulations.drill import netfaults as nf  # noqa: E402
from simulations.drill.nodes import RealCluster, admin_status  # noqa: E402
from simulations.drill.policydoc import document_toml  # noqa: E402
from simulations.drill.serf_agents import SerfAgents  # noqa: E402
from simulations.engine import run_scenario  # noqa: E402
from simulations.scenario import load, override  # noqa: E402

SUBNET = "10.215.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BOOT_TIMEOUT_S = 240.0
DELIVER_TIMEOUT_S = 60.0


class LogTail:
    """Per serial, from one node's JSON log (read incrementally; wall s, the node's own timestamps):
    ``policy.accepted`` (verified and stored: the core's Enforce effect ran), ``policy.applied`` (the kernel
    holds the ruleset: ``nft`` loaded it and the read-back matched) and the apply's own duration (ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.applied: dict[int, float] = {}
        self.accepted: dict[int, float] = {}
        self.apply_ms: dict[int, float] = {}
        self.origin: dict[int, dict[str, Any]] = {}  # serial -> where the body came from (peer, via, wait_ms)
        self.pushed: dict[int, list[str]] = {}  # serial -> where it pushed the body on ("peer:transport")
        self.started = False

    def poll(self) -> None:
        with contextlib.suppress(OSError), self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if ev.get("event") == "meshnode.started":
                        self.started = True
                    elif ev.get("event") == "policy.pushed" and isinstance(ev.get("serial"), int):
                        self.pushed.setdefault(ev["serial"], ev.get("to") or [])
                    elif ev.get("event") in ("policy.applied", "policy.accepted") and isinstance(ev.get("serial"), int):
                        ts = datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
                        if ev["event"] == "policy.accepted":
                            self.accepted.setdefault(ev["serial"], ts)
                            self.origin.setdefault(ev["serial"], {k: ev[k] for k in ("peer", "via", "wait_ms")
                                                                  if k in ev})
                        else:
                            self.applied.setdefault(ev["serial"], ts)
                            if isinstance(ev.get("ms"), (int, float)):
                                self.apply_ms.setdefault(ev["serial"], float(ev["ms"]))


def _cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def _cpu_tree_s(pid: int) -> float:
    """CPU seconds of a daemon with its children: the ones it waited for (``nft`` runs: cutime+cstime)
    and the ones still running (its ``nft monitor``)."""
    total = 0.0
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(f) for f in fields[11:15]) / CLK_TCK
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += sum(int(f) for f in fields[11:15]) / CLK_TCK
    return total


def _host_busy_s() -> float:
    """CPU seconds the whole host spent busy (all processes, every core: /proc/stat)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK  # minus idle and iowait


def _rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


SNMP_KEYS = (("Tcp", "OutSegs"), ("Tcp", "RetransSegs"), ("Udp", "OutDatagrams"), ("Udp", "InDatagrams"),
             ("Udp", "NoPorts"), ("Udp", "InErrors"), ("Udp", "RcvbufErrors"))
TCP_EXT_KEYS = ("TCPLossProbes", "TCPTimeouts", "TCPFastRetrans", "TCPSynRetrans", "TCPSpuriousRtxHostQueues",
                "TCPLossProbeRecovery", "DelayedACKs", "TCPDSACKRecv")


def _net_counters(lab: NetnsLab) -> dict[str, int]:
    """Kernel counters summed over every namespace: TCP segments sent and retransmitted (and why), UDP
    datagrams (``/proc/net/snmp``, ``/proc/net/netstat``)."""
    total: dict[str, int] = {}
    for i in range(lab.count):
        out = nf.run(["ip", "netns", "exec", lab.ns(i), "cat", "/proc/net/snmp", "/proc/net/netstat",
                      "/proc/net/stat/nf_conntrack"], check=False).stdout.decode()
        rows: dict[str, dict[str, str]] = {}
        lines = out.splitlines()
        for name, value in _conntrack_stats(lines).items():
            total[name] = total.get(name, 0) + value
        for head, vals in zip(lines, lines[1:], strict=False):
            h, v = head.split(), vals.split()
            if h and v and h[0] == v[0] and not h[1].isdigit() and v[1].lstrip("-").isdigit():
                rows[h[0].rstrip(":")] = dict(zip(h[1:], v[1:], strict=False))
        for proto, key in (*SNMP_KEYS, *(("TcpExt", k) for k in TCP_EXT_KEYS)):
            name = f"{proto.lower()}_{key}"
            total[name] = total.get(name, 0) + int(rows.get(proto, {}).get(key, 0))
    total["host_backlog_dropped"] = _softnet_dropped()
    return total


def _conntrack_stats(lines: list[str]) -> dict[str, int]:
    """Conntrack's per-CPU counters of one namespace (``/proc/net/stat/nf_conntrack``, hexadecimal, one row
    per CPU), summed: packets it found invalid (the ruleset's ``ct state invalid drop`` drops them),
    insertions that failed, and entries it dropped when full."""
    out = {"conntrack_invalid": 0, "conntrack_insert_failed": 0, "conntrack_drop": 0}
    for i, line in enumerate(lines):
        head = line.split()
        if head[:1] != ["entries"]:
            continue
        for row in lines[i + 1:]:
            vals = row.split()
            if len(vals) != len(head) or not all(all(c in "0123456789abcdefABCDEF" for c in v) for v in vals):
                break
            for key in ("invalid", "insert_failed", "drop"):
                out[f"conntrack_{key}"] += int(vals[head.index(key)], 16)
    return out


def _softnet_dropped() -> int:
    """Packets the host dropped because a CPU's input backlog was full (``/proc/net/softnet_stat``, all
    namespaces: a veth hands every packet to that backlog), counted for the whole host."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def _wait(cond: Any, timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return bool(cond())


def _summary(times_ms: list[float]) -> dict[str, float | None]:
    if not times_ms:
        return {"median_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(times_ms)
    return {"median_ms": round(statistics.median(s), 1), "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))], 1),
            "max_ms": round(s[-1], 1)}


def _split(tails: list[LogTail], serial: int, t0: float, n: int) -> dict[str, Any]:
    """Where one version's time went: the publish hop (start -> first node stored it), inside the mesh
    (first node stored -> last node applied) and on each node (stored -> the kernel holds it)."""
    got = [t.applied[serial] for t in tails if serial in t.applied]
    acc = [t.accepted[serial] for t in tails if serial in t.accepted]
    on_node = sorted(t.applied[serial] - t.accepted[serial] for t in tails
                     if serial in t.applied and serial in t.accepted)
    apply_ms = sorted(t.apply_ms[serial] for t in tails if serial in t.apply_ms)
    complete = len(got) == n
    timeline = sorted(({"node": t.path.parent.name,
                        "stored_ms": round((t.accepted[serial] - t0) * 1000, 1) if serial in t.accepted else None,
                        "applied_ms": round((t.applied[serial] - t0) * 1000, 1) if serial in t.applied else None,
                        "nft_ms": t.apply_ms.get(serial), "pushed": t.pushed.get(serial, []),
                        **t.origin.get(serial, {})} for t in tails),
                      key=lambda e: (e["stored_ms"] is None, e["stored_ms"] or 0.0))
    return {"delivered": len(got), "timeline": timeline,
            "all_ms": round((max(got) - t0) * 1000, 1) if complete else None,
            "first_ms": round((min(got) - t0) * 1000, 1) if got else None,
            "hop_ms": round((min(acc) - t0) * 1000, 1) if acc else None,
            "mesh_ms": round((max(got) - min(acc)) * 1000, 1) if complete and acc else None,
            "last_accepted_ms": round((max(acc) - t0) * 1000, 1) if acc else None,
            "on_node_ms": {"median": round(statistics.median(on_node) * 1000, 1),
                           "max": round(on_node[-1] * 1000, 1)} if on_node else None,
            "apply_ms": {"median": round(statistics.median(apply_ms), 1), "max": round(apply_ms[-1], 1)}
            if apply_ms else None}


def _split_summary(versions: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the versions of the split, and the publish hop's share of publish -> all applied."""
    def med(key: str) -> float | None:
        vals = [v[key] for v in versions if v.get(key) is not None]
        return round(statistics.median(vals), 1) if vals else None
    done = [v for v in versions if v.get("all_ms")]
    hop_share = sum(v["hop_ms"] for v in done) / sum(v["all_ms"] for v in done) if done else None
    return {"hop_median_ms": med("hop_ms"), "mesh_median_ms": med("mesh_ms"), "ack_median_ms": med("ack_ms"),
            "hop_share": round(hop_share, 3) if hop_share is not None else None,
            "on_node_median_ms": round(statistics.median(v["on_node_ms"]["median"] for v in versions
                                                         if v.get("on_node_ms")), 1) if versions else None}


def _cli_version(cluster: RealCluster, tails: list[LogTail], rng: random.Random, serial: int, n: int
                 ) -> dict[str, Any]:
    """One more version published as an operator does, ``meshctl policy publish`` run in the node's namespace
    (the CLI's Python start-up included, as ``serf event``'s start-up is in Serf's figures).  As installed:
    with compiled bytecode (a warm-up import, untimed, writes it to a cache in the run's directory; under
    ``PYTHONDONTWRITEBYTECODE`` every start would compile the sources again)."""
    via = cluster.nodes[rng.randrange(n)]
    envelope = cluster.root / f"policy-{serial}.msgpack"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cluster.root / "pycache")
    subprocess.run([sys.executable, "-c", "import meshnode.cli.meshctl, meshnode.cli.mesh, meshnode.client"],
                   env=env, capture_output=True, timeout=60, check=True)
    argv = ["ip", "netns", "exec", via.ns, sys.executable, "-m", "meshnode.cli", "policy", "publish", str(envelope),
            "--node", via.mesh, "--identity", str(cluster.operator)]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=env)
    ack_ms = (time.time() - t0) * 1000

    def applied() -> bool:
        for t in tails:
            t.poll()
        return all(serial in t.applied for t in tails)

    _wait(applied, DELIVER_TIMEOUT_S)
    return {"serial": serial, "ok": proc.returncode == 0, "ack_ms": round(ack_ms, 1), **_split(tails, serial, t0, n)}


def _datagram_counts(cluster: RealCluster) -> dict[str, int]:
    """The datagram layer's counters (sent, received, retransmits, fallbacks...) summed over the nodes."""
    total: dict[str, int] = {}
    for node in cluster.nodes:
        st = nf.in_netns(node.ns, admin_status) or {}
        for k, v in (st.get("datagrams") or {}).items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
        total["stream_only_paths"] = total.get("stream_only_paths", 0) + len(
            (st.get("datagrams") or {}).get("peers_stream_only") or [])
        for reason, count in ((st.get("datagrams") or {}).get("refused") or {}).items():
            total[f"refused_{reason}"] = total.get(f"refused_{reason}", 0) + int(count)
    return total


def _changing_rule(serial: int) -> str:
    """A rule every node enforces, with a port of its own per version: each version changes every node's
    ruleset (a full ``nft`` load everywhere), not only some nodes' (or none, as the same document does)."""
    return (f'\n[[allow]]\nname = "bench-v{serial}"\nfrom = ["role:svc0"]\nto = ["role:*"]\n'
            f'ports = ["tcp/{40000 + serial}"]\n')


def run_meshnode(lab: NetnsLab, root: Path, n: int, regions: list[str], publishes: int, idle_s: float,
                 rng: random.Random, changing_rules: bool = False, gossip: dict[str, int] | None = None,
                 settle_s: float = 3.0) -> dict[str, Any]:
    receiver = nf.AlertReceiver(lab.bridge_ip, lambda *_a: None)
    cluster = RealCluster(root, lab, n, regions, dict(gossip or {}), receiver.url)
    try:
        envelopes = {}
        for serial in range(1, publishes + 3):  # the last one is published with the meshctl CLI
            doc = root / f"policy-{serial}.toml"
            doc.write_text(document_toml(50) + (_changing_rule(serial) if changing_rules else ""))
            envelopes[serial] = cluster.sign(doc, serial).read_bytes()
        tails = [LogTail(node.dir / "meshnode.log") for node in cluster.nodes]
        t_boot = time.monotonic()
        for node in cluster.nodes:
            node.start()

        def all_started() -> bool:
            for t in tails:
                t.poll()
            return all(t.started for t in tails)

        if not _wait(all_started, BOOT_TIMEOUT_S, 0.5):
            raise RuntimeError(f"not every node started in {BOOT_TIMEOUT_S:.0f} s (logs under {root})")
        boot_s = time.monotonic() - t_boot
        first = cluster.nodes[0]
        nf.in_netns(first.ns, lambda: publish(first.mesh, cluster.operator, envelopes[1], timeout_s=30))

        def all_applied(serial: int) -> bool:
            for t in tails:
                t.poll()
            return all(serial in t.applied for t in tails)

        if not _wait(lambda: all_applied(1), BOOT_TIMEOUT_S, 0.2):
            raise RuntimeError(f"serial 1 not applied everywhere in {BOOT_TIMEOUT_S:.0f} s (logs under {root})")
        time.sleep(settle_s)  # let the directory settle (and, given longer, the channels form)
        pids = [node.proc.pid for node in cluster.nodes if node.proc is not None]
        dg0 = _datagram_counts(cluster)
        cpu0, net0, wall0 = sum(_cpu_s(p) for p in pids), _net_counters(lab), time.monotonic()
        tree0, host0 = sum(_cpu_tree_s(p) for p in pids), _host_busy_s()
        versions = []
        for serial in range(2, publishes + 2):
            via = cluster.nodes[rng.randrange(n)]
            t0 = time.time()
            reply = nf.in_netns(via.ns, lambda v=via, s=serial: publish(v.mesh, cluster.operator, envelopes[s],
                                                                       timeout_s=30))
            ack_ms = (time.time() - t0) * 1000
            _wait(lambda s=serial: all_applied(s), DELIVER_TIMEOUT_S)
            versions.append({"serial": serial, "via": via.node_id, "ok": bool(reply.get("ok")),
                             "ack_ms": round(ack_ms, 1), **_split(tails, serial, t0, n)})
            time.sleep(1.0)
        busy_wall = time.monotonic() - wall0
        cli = _cli_version(cluster, tails, rng, publishes + 2, n)
        cpu_busy = sum(_cpu_s(p) for p in pids) - cpu0
        tree_busy, host_busy = sum(_cpu_tree_s(p) for p in pids) - tree0, _host_busy_s() - host0
        net = _delta(_net_counters(lab), net0)
        dg1 = _datagram_counts(cluster)
        rto_ms = sorted(v for node in cluster.nodes
                        for v in ((nf.in_netns(node.ns, admin_status) or {}).get("datagrams") or {}).get("rto_ms", []))
        datagrams = {k: dg1.get(k, 0) - dg0.get(k, 0) for k in sorted(dg1) if k != "stream_only_paths"}
        datagrams["stream_only_paths_before_after"] = [dg0.get("stream_only_paths", 0), dg1.get("stream_only_paths", 0)]
        datagrams["refused_before"] = {k: v for k, v in dg0.items() if k.startswith("refused_")}
        cpu_idle0 = {p: _cpu_s(p) for p in pids}
        dg_idle0 = _datagram_counts(cluster)
        time.sleep(idle_s)
        idle = [(_cpu_s(p) - cpu_idle0[p]) / idle_s * 100 for p in pids]
        # what the idle CPU pays for: datagrams received per daemon per second (SWIM probes and acks)
        idle_received = (_datagram_counts(cluster).get("received", 0) - dg_idle0.get("received", 0)) / n / idle_s
        rss = [_rss_mib(p) for p in pids]
        done = [v["all_ms"] for v in versions if v["all_ms"] is not None]
        return {"boot_s": round(boot_s, 1), "versions": versions, **_summary(done),
                "complete": f"{len(done)}/{len(versions)}",
                "ack_median_ms": round(statistics.median(v["ack_ms"] for v in versions), 1),
                "daemon_cpu_during_publishes_cores": round(cpu_busy / busy_wall, 2),
                "cpu_s_per_version": {"daemons": round(cpu_busy / len(versions), 3),
                                      "daemons_with_nft": round(tree_busy / len(versions), 3),
                                      "host_all_processes": round(host_busy / len(versions), 3)},
                "tcp_retrans_segs": net["tcp_RetransSegs"], "net": net, "datagrams": datagrams, "meshctl_cli": cli,
                "datagram_rto_ms": {"median": statistics.median(rto_ms), "p90": rto_ms[int(0.9 * len(rto_ms))],
                                    "max": rto_ms[-1]} if rto_ms else None,
                "split": _split_summary(versions),
                "idle_cpu_pct_per_daemon": {"median": round(statistics.median(idle), 2), "max": round(max(idle), 2)},
                "idle_datagrams_received_per_daemon_s": round(idle_received, 2),
                "rss_mib_per_daemon": {"median": round(statistics.median(rss), 1), "max": round(max(rss), 1)}}
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        receiver.server.shutdown()


def run_serf(lab: NetnsLab, root: Path, n: int, events: int, rng: random.Random,
             settle_s: float = 3.0) -> dict[str, Any]:
    agents = SerfAgents(n, lab.exec_argv, lab.ip, root / "serf")
    try:
        agents.start()
        if not agents.wait_formed(BOOT_TIMEOUT_S):
            raise RuntimeError(f"serf: only {agents.alive_members()} of {n} agents alive")
        time.sleep(settle_s)  # as long as the daemons are given
        alive_at_start = agents.alive_members()
        net0, host0 = _net_counters(lab), _host_busy_s()
        agents0 = sum(_cpu_tree_s(p.pid) for p in agents.procs)
        out = []
        for k in range(events):
            payload = f"v{k}-{rng.randrange(1 << 30)}"
            t0 = agents.fire(rng.randrange(n), payload)
            got = agents.wait_delivered(payload, DELIVER_TIMEOUT_S)
            out.append({"event": payload, "delivered": len(got),
                        "all_ms": round((max(got.values()) - t0) * 1000, 1) if len(got) == n else None})
            time.sleep(1.0)
        net, host_busy = _delta(_net_counters(lab), net0), _host_busy_s() - host0
        done = [e["all_ms"] for e in out if e["all_ms"] is not None]
        return {"events": out, **_summary(done), "complete": f"{len(done)}/{len(out)}",
                "alive_seen_by_agent_0_at_start": alive_at_start,
                "tcp_retrans_segs": net["tcp_RetransSegs"], "net": net,
                "host_cpu_s_per_event": round(host_busy / len(out), 3),
                "agents_cpu_s_per_event": round((sum(_cpu_tree_s(p.pid) for p in agents.procs) - agents0) / len(out), 3)}
    finally:
        agents.stop()


def predict(n: int, loss: int, regions: int, publishes: int, seed: int, base: str = "netns-12",
            gossip: dict[str, int] | None = None) -> dict[str, Any]:
    """The simulator's prediction for the same topology (no added latency, as on the bridge) at ``n`` nodes
    in ``regions`` regions with ``loss`` on every packet, ``publishes`` versions one per 10 s, from the
    ``base`` scenario: ``netns-12`` (the daemon's transport, ``mixed``, and one host's 2 shared cores,
    calibrated on this benchmark) or ``loopback-12`` (the older prediction: every message on TCP, a CPU
    per node)."""
    sc = override(load(base), nodes=n, seed=seed, loss=loss / 100)
    if gossip:
        sc = msgspec.structs.replace(sc, gossip={**sc.gossip, **gossip})
    names = [f"region-{chr(ord('a') + r)}" for r in range(regions)]
    start = 30_000
    sc = msgspec.structs.replace(
        sc, nodes=msgspec.structs.replace(sc.nodes, regions=names),
        policy=msgspec.structs.replace(sc.policy, rules=50,
                                       publish_at_ms=[start + 10_000 * k for k in range(publishes)]),
        duration_ms=start + 10_000 * publishes + 20_000)
    report, _ = run_scenario(sc, progress=False)
    done = [v["t100_ms"] for v in report["versions"] if v["t100_ms"] is not None]
    return {**_summary(done), "complete": f"{len(done)}/{len(report['versions'])}"}


NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"
NEIGH_FOR_BENCH = (4096, 8192, 16384)


@contextlib.contextmanager
def roomy_neighbour_table() -> Any:
    """The kernel's ARP table is shared by every namespace and its default ceiling (gc_thresh3 = 1024
    entries) overflows at ~32 fully meshed namespaces ("neighbor table overflow"): packets of both
    systems are dropped for lack of an ARP entry, not by the loss rules. Raised for the run, restored."""
    saved = [Path(NEIGH.format(k)).read_text().strip() for k in (1, 2, 3)]
    try:
        for k, v in zip((1, 2, 3), NEIGH_FOR_BENCH, strict=True):
            Path(NEIGH.format(k)).write_text(str(max(v, int(saved[k - 1]))))
        yield
    finally:
        for k, v in zip((1, 2, 3), saved, strict=True):
            Path(NEIGH.format(k)).write_text(v)


def bench_one(n: int, loss: int, args: argparse.Namespace) -> dict[str, Any]:
    regions = [f"region-{chr(ord('a') + r)}" for r in range(args.regions)]
    # Names of its own per case: a deleted namespace's veths go away asynchronously.
    case = f"{n % 1000}{loss % 100}"[-3:]
    lab = NetnsLab(n, prefix=f"pmbn{case}", bridge_prefix=f"pmbb{case}", veth_prefix=f"pv{case}", subnet=SUBNET,
                   what="tests/bench_netns.py")
    root = Path(tempfile.mkdtemp(prefix=f"bench-netns-{n}-{loss}-"))
    rng = random.Random(f"{args.seed}:{n}:{loss}")
    out: dict[str, Any] = {"nodes": n, "loss_pct": loss, "regions": args.regions, "changing_rules": args.changing_rules,
                           "gossip": args.gossip, "timeline": args.timeline, "settle_s": args.settle_s}
    try:
        lab.setup()
        for i in range(n):
            table = nf.DrillTable(lab.ns(i), lab.bridge_ip)
            table.loss_pct = loss
            table.load()
        # Serf first: the daemons' nftables ruleset stays in the kernel after they stop (by design), and
        # it does not open Serf's port.
        if not args.no_serf:
            print(f"--- {n} nodes, {loss}% loss: serf ...", flush=True)
            out["serf"] = run_serf(lab, root, n, args.publishes, random.Random(f"{args.seed}:{n}:{loss}:serf"),
                                   args.settle_s)
        print(f"--- {n} nodes, {loss}% loss: meshnode ...", flush=True)
        out["meshnode"] = run_meshnode(lab, root, n, regions, args.publishes, args.idle_s, rng, args.changing_rules,
                                       args.gossip, args.settle_s)
        if not args.no_serf:
            m, s = out["meshnode"]["median_ms"], out["serf"]["median_ms"]
            out["ratio_of_medians"] = round(m / s, 3) if m and s else None
    finally:
        lab.teardown()
    out["simulator"] = predict(n, loss, args.regions, args.publishes, args.seed, gossip=args.gossip)
    out["simulator_old"] = predict(n, loss, args.regions, args.publishes, args.seed, base="loopback-12",
                                   gossip=args.gossip)
    measured, predicted = out["meshnode"]["median_ms"], out["simulator"]["median_ms"]
    out["predicted_over_measured"] = round(predicted / measured, 3) if measured and predicted else None
    _print_one(out)
    return out


def _print_one(r: dict[str, Any]) -> None:
    m = r["meshnode"]
    print(f"{r['nodes']} nodes, {r['loss_pct']}% loss")
    for v in m["versions"]:
        print(f"  meshnode serial {v['serial']} via {v['via']}: ack {v['ack_ms']} ms, hop {v['hop_ms']} ms, "
              f"first applied {v['first_ms']} ms, all {v['all_ms']} ms ({v['delivered']}/{r['nodes']}); in mesh "
              f"{v['mesh_ms']} ms, last stored {v['last_accepted_ms']} ms, on node {v['on_node_ms']}, "
              f"nft apply {v['apply_ms']}")
        if r.get("timeline"):
            for e in v["timeline"]:
                print(f"      {e['node']} stored {e['stored_ms']} applied {e['applied_ms']} (nft {e['nft_ms']}) "
                      f"from {e.get('peer', '-')} via {e.get('via', '-')}"
                      + (f" (fragments waited {e['wait_ms']} ms)" if "wait_ms" in e else "")
                      + (f"; pushed to {' '.join(e['pushed'])}" if e.get("pushed") else ""))
    print(f"  meshnode: median {m['median_ms']} / p99 {m['p99_ms']} / max {m['max_ms']} ms, complete {m['complete']}, "
          f"ack median {m['ack_median_ms']} ms, tcp retrans {m['tcp_retrans_segs']}, daemons used "
          f"{m['daemon_cpu_during_publishes_cores']} cores during publishes; idle CPU/daemon "
          f"{m['idle_cpu_pct_per_daemon']} % ({m.get('idle_datagrams_received_per_daemon_s')} datagrams received/s), RSS {m['rss_mib_per_daemon']} MiB; boot {m['boot_s']} s")
    print(f"  meshnode split: {m['split']}; datagrams {m['datagrams']} (retransmission timers after the "
          f"publishes, ms: {m.get('datagram_rto_ms')}); kernel {m['net']}")
    print(f"  meshnode CPU s per version (publish + 1 s pause): {m['cpu_s_per_version']}")
    c = m["meshctl_cli"]
    print(f"  one more version through the meshctl CLI (its Python start-up included, bytecode cached): ok {c['ok']}, ack {c['ack_ms']} ms, "
          f"hop {c['hop_ms']} ms, all {c['all_ms']} ms ({c['delivered']}/{r['nodes']})")
    if "serf" in r:
        s = r["serf"]
        for e in s["events"]:
            print(f"  serf {e['event']}: all {e['all_ms']} ms ({e['delivered']}/{r['nodes']})")
        print(f"  serf: median {s['median_ms']} / p99 {s['p99_ms']} / max {s['max_ms']} ms, complete {s['complete']}, "
              f"tcp retrans {s['tcp_retrans_segs']}, alive at start {s['alive_seen_by_agent_0_at_start']}/{r['nodes']}")
        print(f"  serf kernel {s['net']}; CPU s per event (fire + 1 s pause): agents "
              f"with handlers {s['agents_cpu_s_per_event']}, host {s['host_cpu_s_per_event']}")
        print(f"  ratio of medians policymesh/serf: {r['ratio_of_medians']}")
    p, q = r["simulator"], r["simulator_old"]
    print(f"  simulator, same topology (netns-12): median {p['median_ms']} / max {p['max_ms']} ms ({p['complete']}); "
          f"predicted/measured {r['predicted_over_measured']}; loopback-12 model (TCP only, a CPU per node): "
          f"median {q['median_ms']} / max {q['max_ms']} ms")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_netns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="12,50,100", help="node counts, comma-separated (default 12,50,100)")
    p.add_argument("--loss", default="0,10", help="kernel packet loss in %%, comma-separated (default 0,10)")
    p.add_argument("--publishes", type=int, default=6, help="versions (and Serf events) per case (default 6)")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=10.0, help="idle window for CPU per daemon (default 10 s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-serf", action="store_true", help="skip the Serf baseline")
    p.add_argument("--changing-rules", action="store_true",
                   help="every version changes every node's ruleset (default: the same document, new serials)")
    p.add_argument("--timeline", action="store_true",
                   help="print each version's per-node timeline: stored and applied (ms after the publish "
                        "started), from which peer, by which transport (stream, datagram, fragments: the "
                        "wait from the first fragment to the last)")
    p.add_argument("--gossip", action="append", default=[], metavar="NAME=INT",
                   help="a [gossip] setting for every daemon and the simulator's prediction (repeatable), e.g. "
                        "announce_rounds=2")
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="wait this long after the first version reached every node before publishing (default 3 s; Serf's "
                        "agents get as long once they have formed; "
                        "a daemon opens a channel to a peer when it first probes or pushes to it, about one peer a "
                        "second, so at 100 nodes the mesh forms its channels for ~100 s)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--predict-only", action="store_true",
                   help="only the simulator's predictions for each size and loss (netns-12 and loopback-12 models)")
    args = p.parse_args(argv)
    try:
        args.gossip = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in args.gossip)}
    except ValueError:
        p.error("--gossip takes NAME=INT, e.g. announce_rounds=2")
    if args.predict_only:
        for n in args.sizes.split(","):
            for loss in args.loss.split(","):
                new = predict(int(n), int(loss), args.regions, args.publishes, args.seed)
                old = predict(int(n), int(loss), args.regions, args.publishes, args.seed, base="loopback-12")
                print(f"  {n:>4} {loss:>3}% | netns-12 median {new['median_ms']} / max {new['max_ms']} ms "
                      f"({new['complete']}) | loopback-12 median {old['median_ms']} / max {old['max_ms']} ms", flush=True)
        return 0
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, nftables)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop still tears the namespaces down
    with roomy_neighbour_table():
        results = [bench_one(int(n), int(loss), args) for n in args.sizes.split(",") for loss in args.loss.split(",")]
    print("\nsummary: nodes loss | meshnode median/max ms complete | serf median/max ms complete | ratio | "
          "simulator median ms, predicted/measured")
    for r in results:
        m, s, p = r["meshnode"], r.get("serf", {}), r["simulator"]
        print(f"  {r['nodes']:>4} {r['loss_pct']:>3}% | {m['median_ms']}/{m['max_ms']} {m['complete']} | "
              f"{s.get('median_ms')}/{s.get('max_ms')} {s.get('complete')} | {r.get('ratio_of_medians')} | "
              f"{p['median_ms']}, {r['predicted_over_measured']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
