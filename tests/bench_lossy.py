"""Benchmark under kernel packet loss: real `meshnode` daemons and real Serf agents in one network
namespace whose nftables drop a share of every packet (default 10%), in the same run.

    .venv/bin/python tests/bench_lossy.py [--nodes 12] [--publishes 12] [--events 8] [--loss 10]
                                          [--no-serf] [--json FILE]

Needs root (a network namespace and nftables). Everything runs on the namespace's loopback, so every
packet, TCP or UDP, of either system crosses the loss rule once (`numgen random mod 100 < LOSS drop` in
the output hook). Measures:
  * policymesh: from the operator starting `publish` (to two nodes at once; the first acceptance wins)
    to the last node logging `policy.applied` (the nodes' own log timestamps), per version; the
    publish hop's share (until the operator got its acknowledgement); datagram counters (sent,
    retransmitted, fallen back to the stream) from the nodes' status;
  * Serf: `tests/serf_anchor.sh N K` (user events, time to the last agent's handler) in the same namespace;
  * the namespace's TCP retransmitted segments during each side (/proc/net/snmp RetransSegs);
and prints the ratio of the medians (policymesh / Serf). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBNET = 175


def _ts(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def tcp_retrans() -> int:
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def inner_mesh(n: int, publishes: int) -> dict:
    """Inside the namespace: a cluster of ``n`` daemons in three regions, ``publishes`` versions."""
    from meshnode.client import publish_first
    from tests.daemon_helpers import Cluster

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="pmbench")), SUBNET)
    nodes = [cluster.add_node(f"bl-{i}", f"region-{i % 3}") for i in range(n)]
    try:
        cluster.start(nodes)
        cluster.wait_members(nodes, timeout_s=120)
        time.sleep(12)  # the first housekeeping round opens the broadcast tree's channels
        retrans0 = tcp_retrans()
        total, hop = [], []
        for k in range(publishes):
            serial, data = cluster.sign()
            targets = [nodes[k % n].mesh, nodes[(k + n // 2) % n].mesh]
            t0 = time.time()
            answer = publish_first(targets, cluster.operator, data)
            t1 = time.time()
            assert answer.reply.get("ok"), answer.reply
            cluster.wait_serial(serial, nodes, timeout_s=60)
            time.sleep(0.3)
            last = max(_ts(e["timestamp"]) for node in nodes for e in node.log_events()
                       if e.get("event") == "policy.applied" and e.get("serial") == serial)
            total.append(round(1000 * (last - t0), 1))
            hop.append(round(1000 * (t1 - t0), 1))
        retrans = tcp_retrans() - retrans0
        counters = {"sent": 0, "retransmits": 0, "fallbacks": 0}
        for node in nodes:
            for _ in range(10):
                st = node.status()
                if st:
                    for key in counters:
                        counters[key] += int(st.get("datagrams", {}).get(key, 0))
                    break
        return {"ms": total, "publish_hop_ms": hop, "tcp_retrans_segs": retrans, "datagrams": counters}
    finally:
        cluster.close()


def inner_serf(n: int, events: int) -> dict:
    retrans0 = tcp_retrans()
    proc = subprocess.run(["bash", str(ROOT / "tests" / "serf_anchor.sh"), str(n), str(events)],
                          capture_output=True, text=True, timeout=600)
    lats = [int(m.group(2)) for m in re.finditer(r"event v\d+: (\d+)/\d+ agents, last after (-?\d+) ms", proc.stdout)]
    delivered = [int(m.group(1)) for m in re.finditer(r"event v\d+: (\d+)/\d+ agents", proc.stdout)]
    return {"ms": lats, "delivered": delivered, "tcp_retrans_segs": tcp_retrans() - retrans0,
            "output": proc.stdout[-2000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--publishes", type=int, default=12)
    ap.add_argument("--events", type=int, default=8)
    ap.add_argument("--loss", type=int, default=10, help="percent of packets dropped (0-99)")
    ap.add_argument("--no-serf", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--inner", choices=["mesh", "serf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner == "mesh":
        print(json.dumps(inner_mesh(args.nodes, args.publishes)))
        return 0
    if args.inner == "serf":
        print(json.dumps(inner_serf(args.nodes, args.events)))
        return 0
    if os.geteuid() != 0:
        print("needs root (a network namespace and nftables)", file=sys.stderr)
        return 2
    ns = f"pmbl-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    results: dict = {"nodes": args.nodes, "loss_percent": args.loss}
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        if args.loss:
            rule = (f"table inet pmbl {{ chain out {{ type filter hook output priority 0; "
                    f"numgen random mod 100 < {args.loss} drop; }}; }}")
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rule, text=True, check=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        sides = ["mesh"] + ([] if args.no_serf else ["serf"])
        for side in sides:
            proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", side,
                                   "--nodes", str(args.nodes), "--publishes", str(args.publishes),
                                   "--events", str(args.events)], capture_output=True, text=True, env=env,
                                  timeout=1200, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    mesh = results["mesh"]
    med = statistics.median(mesh["ms"])
    hop = statistics.median(mesh["publish_hop_ms"])
    print(f"policymesh, {args.nodes} daemons, {args.loss}% loss: publish -> all applied per version (ms): {mesh['ms']}")
    print(f"  median {med:.0f} ms, max {max(mesh['ms']):.0f} ms; publish hop median {hop:.0f} ms "
          f"({100 * hop / med:.0f}% of the median); TCP segments retransmitted {mesh['tcp_retrans_segs']}; "
          f"datagrams {mesh['datagrams']}")
    if "serf" in results:
        serf = results["serf"]
        smed = statistics.median(serf["ms"]) if serf["ms"] else None
        print(f"serf, {args.nodes} agents: time to last agent per event (ms): {serf['ms']} "
              f"(delivered {serf['delivered']}); TCP segments retransmitted {serf['tcp_retrans_segs']}")
        if smed:
            results["ratio"] = round(med / smed, 3)
            print(f"  median {smed:.0f} ms; ratio policymesh / serf (medians) = {med / smed:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
