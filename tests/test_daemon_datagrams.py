"""Encrypted datagrams on real daemons: peers carry SWIM probes and small dissemination messages over UDP
once a path probe was answered; junk sent to the UDP port is refused, counted and never answered; and with nftables
dropping one node's UDP (in a network namespace) every node still converges over the stream, with that
node reported as stream-only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.daemon.datagrams import MAX_FRAGMENTED, MAX_FRAME
from protocol.channel.datagram_policy import compressed
from tests.daemon_helpers import Cluster, metric_sum, wait_until
from tests.netns import skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SUBNET = 171
BLOCKED_IP = "127.66.172.3"  # tests/datagram_lab.py: subnet 172, node index 2


def test_paths_come_up_and_junk_datagrams_are_refused_counted_and_unanswered(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, SUBNET)
    try:
        nodes = [cluster.add_node(f"udp-{i}", "region-a") for i in range(3)]
        cluster.start(nodes)
        cluster.wait_members(nodes)
        serial, data = cluster.sign()
        assert cluster.publish(nodes[0], data)["ok"]
        cluster.wait_serial(serial, nodes)
        others = {n.node_id for n in nodes}
        wait_until(lambda: all(set(n.status()["datagrams"]["peers_datagram"]) == others - {n.node_id}
                               for n in nodes), 30, "every path up", interval_s=0.2)
        # SWIM probes and acks travel as datagrams too: in a quiet window (no publish, paths up) every
        # node still sends and receives datagrams, about two per probe round (1 s)
        before = {n.node_id: n.status()["datagrams"] for n in nodes}
        time.sleep(4.0)
        for n in nodes:
            now = n.status()["datagrams"]
            assert now["sent"] - before[n.node_id]["sent"] >= 4, (n.node_id, before[n.node_id], now)
            assert now["received"] - before[n.node_id]["received"] >= 4, (n.node_id, before[n.node_id], now)
            view = n.status()["cluster_view"]["members"]
            assert all(m["liveness"] == "alive" for m in view), view
        target = nodes[0]
        st = target.status()["datagrams"]
        assert st["udp"] == target.mesh and st["received"] > 0
        # Junk from an unauthenticated source: truncated, unknown session, a forged transport datagram.
        junk = [b"", b"\x01", os.urandom(20), b"\x01" + os.urandom(60), bytes([1]) + bytes(8) + os.urandom(100)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((cluster.ip(11), 0))
            s.settimeout(1.0)
            host, port = target.mesh.rsplit(":", 1)
            for j in junk:
                s.sendto(j, (host, int(port)))
            with pytest.raises(TimeoutError):
                s.recvfrom(2048)  # nothing answers an unauthenticated source
        wait_until(lambda: sum(target.status()["datagrams"]["refused"].values()) >= len(junk), 10,
                   "junk counted", interval_s=0.1)
        refused = target.status()["datagrams"]["refused"]
        assert set(refused) <= {"truncated", "unknown_session"}, refused
        assert metric_sum(target.metrics(), "policymesh_frames_refused_total", reason="datagram_unknown_session") >= 1
        assert target.alive
        # The mesh still works after the junk; a policy of several datagrams goes compressed, as
        # fragments when still larger than one (random rule names: it does not shrink to one datagram).
        extra = "".join(f'\n[[allow]]\nname = "bulk-{os.urandom(24).hex()}"\nfrom = ["role:web"]\n'
                        f'to = ["role:web"]\nports = ["tcp/{20000 + i}"]\n' for i in range(60))
        serial, data = cluster.sign(extra)
        packed = compressed(data)
        assert MAX_FRAME < len(data) <= MAX_FRAGMENTED and packed is not None and len(packed) > MAX_FRAME

        def total(key: str) -> int:
            return sum(n.status()["datagrams"][key] for n in nodes)
        before = (total("reassembled"), total("compressed"))
        assert cluster.publish(nodes[1], data)["ok"]
        cluster.wait_serial(serial, nodes)
        wait_until(lambda: total("reassembled") > before[0] and total("compressed") > before[1], 10,
                   "a compressed body reassembled from fragments", interval_s=0.1)
    finally:
        cluster.close()


def test_a_node_whose_udp_is_dropped_by_nftables_converges_over_the_stream(tmp_path: Path) -> None:
    reason = skip_reason("nft")
    if reason:
        pytest.skip(reason)
    ns = f"pmdg-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        rules = (f"table inet pmdg {{ chain out {{ type filter hook output priority 0; "
                 f"ip saddr {BLOCKED_IP} meta l4proto udp drop; ip daddr {BLOCKED_IP} meta l4proto udp drop; }}; }}")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.datagram_lab", str(tmp_path)],
                              capture_output=True, text=True, timeout=200, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    last = result["published"][-1]
    assert all(serial >= last for serial in result["applied"].values()), result["applied"]
    blocked = result["blocked"]
    dg = result["datagrams"]
    assert set(dg[blocked]["peers_stream_only"]) == set(dg) - {blocked} and not dg[blocked]["peers_datagram"]
    for node, st in dg.items():
        if node != blocked:
            assert blocked in st["peers_stream_only"] and set(st["peers_datagram"]) == set(dg) - {node, blocked}
