"""Peers validate each other from outside: real meshnode daemons, one network namespace each, real nftables.

A hole that the node cannot see about itself — its own table intact, so its drift check stays green — is
found by a peer's external probe and paged through the strict PagerDuty receiver, shows in `meshctl
status`, and resolves when it closes. The hole is a port forward in a second nftables table (a DNAT to a
"container" namespace behind the node, as Docker publishes ports): that traffic takes the forward path,
which the node's input chain never sees. A plain ``accept`` in a second table is shown not to be a hole:
netfilter runs every base chain of a hook, and the policymesh chain's drop is final.

Then a member that dies is one ``peer_unreachable`` alert, resolved when it is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import render_config
from tests.daemon_helpers import Cluster, NodeProc, meshctl, wait_until
from tests.netns import Lab, lab_or_skip, run

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]

MESH, ADMIN, HOLE, RECEIVER_PORT = 7946, 9946, 9999, 18080
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
CTR_NET = "192.168.77"
ROLES = {"a": "web", "b": "db", "c": "app"}
ACCEPT_TABLE = f"""table inet pmtest_accept {{
  chain input {{ type filter hook input priority -10; policy accept; tcp dport {HOLE} accept; }}
}}
"""
HOLE_TABLE = f"""table ip pmtest_hole {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept; tcp dport {HOLE} dnat to {CTR_NET}.2; }}
}}
"""


class Mesh:
    def __init__(self, lab: Lab, cluster: Cluster, root: Path) -> None:
        self.lab, self.cluster, self.root = lab, cluster, root
        self.nodes: dict[str, NodeProc] = {}
        prefix = lab.addr4["a"].rsplit(".", 1)[0]
        self.receiver_ip = f"{prefix}.254"
        self.dump = root / "received.json"

    def start_receiver(self) -> None:
        run(["ip", "-n", self.lab.bridge_ns, "addr", "add", f"{self.receiver_ip}/24", "dev", "br0"])
        proc = subprocess.Popen(["ip", "netns", "exec", self.lab.bridge_ns, sys.executable, "-m",
                                 "tests.pagerduty_receiver", self.receiver_ip, str(RECEIVER_PORT), str(self.dump)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.lab.procs.append(proc)  # killed by lab.down()
        wait_until(self.dump.exists, 20, "the receiver")

    def received(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.dump.read_text()))
        except (OSError, ValueError):
            return {"events": [], "rejected": []}

    def add_node(self, host: str, envelope: bytes, seeds: list[str]) -> NodeProc:
        addr = self.lab.addr4[host]
        d = self.root / f"v-{host}"
        meshctl("node", "enroll", "--authority", self.cluster.authority, "--node-id", f"v-{host}", "--region",
                "r1" if host != "c" else "r2", "--role", ROLES[host], "--address", addr, "--out", d,
                "--valid", "1d", *self.cluster.key_args("enroll"))
        text = render_config(cluster=self.cluster.name, node_id=f"v-{host}", region="r1" if host != "c" else "r2",
                             listen=f"{addr}:{MESH}", advertise=f"{addr}:{MESH}", seeds=seeds,
                             admin_listen=f"127.0.0.1:{ADMIN}", backend="nftables", source_address=addr,
                             gossip={"sync_interval_ms": 1000, "cross_region_sync_interval_ms": 2000})
        text = text.replace('drop_dir = ""', 'drop_dir = "drop"')
        key = d / "pagerduty.key"
        key.write_text(ROUTING_KEY + "\n")
        os.chmod(key, 0o600)
        text += (f'\n[alerts]\npagerduty_routing_key_file = "pagerduty.key"\n'
                 f'pagerduty_url = "http://{self.receiver_ip}:{RECEIVER_PORT}/v2/enqueue"\n'
                 "\n[validate]\nport_audit_s = 0\npeer_probe_interval_s = 5\npeer_probe_targets = 2\n"
                 f"peer_probe_refused = 16\npeer_probe_timeout_s = 1\npeer_probe_ports = [{HOLE}]\n"
                 "unreachable_after_s = 10\n")
        (d / "node.toml").write_text(text)
        (d / "drop").mkdir()
        (d / "drop" / "policy.signed").write_bytes(envelope)
        node = NodeProc(f"v-{host}", "r1", ROLES[host], addr, MESH, ADMIN, d,
                        wrapper=["ip", "netns", "exec", self.lab.ns[host]])
        self.nodes[host] = node
        return node

    def meshctl_json(self, host: str, command: str) -> dict[str, Any] | None:
        proc = self.lab.exec(host, [sys.executable, "-m", "meshnode.cli", command, "--node",
                                    f"{self.lab.addr4[host]}:{MESH}", "--identity", str(self.cluster.operator),
                                    "--json", "--timeout", "5"], check=False)
        if proc.returncode != 0:
            return None
        return dict(json.loads(proc.stdout))

    def probes_of(self, target: str, since: float) -> list[dict[str, Any]]:
        """The probe log events of every node about ``target`` logged after ``since`` (wall clock)."""
        out = []
        for n in self.nodes.values():
            for e in n.log_events():
                if e.get("event") == "validate.peer_probed" and e.get("target") == target \
                        and _ts(e) >= since:
                    out.append(e)
        return out

    def triggers(self, check: str) -> list[dict[str, Any]]:
        return [e for e in self.received()["events"]
                if e["event_action"] == "trigger" and e["payload"]["class"] == check]

    def resolves(self, key: str) -> list[dict[str, Any]]:
        return [e for e in self.received()["events"] if e["event_action"] == "resolve" and e["dedup_key"] == key]


def _ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(event.get("timestamp")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _add_container(lab: Lab) -> None:
    """A namespace behind node b (a veth pair, b forwarding), with a listener on the hole port."""
    ctr = f"{lab.prefix}-ctr"
    run(["ip", "netns", "add", ctr])
    lab.created.append(ctr)
    lab.ns["ctr"] = ctr
    run(["ip", "link", "add", "ctr0", "netns", lab.ns["b"], "type", "veth", "peer", "name", "eth0", "netns", ctr])
    run(["ip", "-n", lab.ns["b"], "addr", "add", f"{CTR_NET}.1/24", "dev", "ctr0"])
    run(["ip", "-n", lab.ns["b"], "link", "set", "ctr0", "up"])
    run(["ip", "-n", ctr, "link", "set", "lo", "up"])
    run(["ip", "-n", ctr, "addr", "add", f"{CTR_NET}.2/24", "dev", "eth0"])
    run(["ip", "-n", ctr, "link", "set", "eth0", "up"])
    run(["ip", "-n", ctr, "route", "add", "default", "via", f"{CTR_NET}.1"])
    lab.exec("b", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lab.start_listener("ctr", [HOLE])


def test_a_hole_the_node_cannot_see_is_caught_from_outside(tmp_path: Path) -> None:
    lab = lab_or_skip("nft")
    cluster = Cluster(tmp_path / "cluster", subnet=96)  # the authority and the operator (no loopback nodes)
    mesh = Mesh(lab, cluster, tmp_path)
    try:
        mesh.start_receiver()
        _, envelope = cluster.sign()  # web -> app tcp/8080, app -> db tcp/5432; nothing opens tcp/9999
        a = mesh.add_node("a", envelope, [])
        mesh.add_node("b", envelope, [a.mesh])
        mesh.add_node("c", envelope, [a.mesh])
        lab.start_listener("b", [HOLE])  # a local service on the forbidden port: the policy drops it
        for n in mesh.nodes.values():
            n.start()
        for n in mesh.nodes.values():
            wait_until(lambda n=n: any(e.get("event") == "policy.applied" for e in n.log_events()), 60,
                       f"{n.node_id} enforcing")
        b4 = lab.addr4["b"]
        assert lab.probe("a", [(b4, HOLE)]) == ["timeout"]  # (tests.netns probes wait for the listener's "ok")

        # Peers probe b from outside, the hole port among the must-be-refused ones.
        t0 = time.time()
        wait_until(lambda: len({e["node"] for e in mesh.probes_of("v-b", t0)}) == 2, 60, "both peers probing v-b")
        assert all(e["ports"][f"refused:{HOLE}"] == "filtered" for e in mesh.probes_of("v-b", t0))

        # An accept in a second table is no hole: the policymesh chain still drops.
        lab.exec("b", ["nft", "-f", "-"], stdin=ACCEPT_TABLE.encode())
        t1 = time.time()
        assert lab.probe("a", [(b4, HOLE)]) == ["timeout"]
        wait_until(lambda: len(mesh.probes_of("v-b", t1 + 0.5)) >= 2, 60, "probes after the accept table")
        assert all(e["ports"][f"refused:{HOLE}"] == "filtered" for e in mesh.probes_of("v-b", t1 + 0.5))
        assert not mesh.triggers("enforcement_hole")

        # A port forward in a second table is a hole: traffic to tcp/9999 goes to the container behind b.
        _add_container(lab)
        lab.exec("b", ["nft", "-f", "-"], stdin=HOLE_TABLE.encode())
        t2 = time.time()
        assert lab.probe("a", [(b4, HOLE)]) == ["open"]
        triggers = wait_until(lambda: mesh.triggers("enforcement_hole"), 60, "the enforcement_hole page")
        took_s = time.time() - t2
        hole = triggers[0]
        details = hole["payload"]["custom_details"]
        assert details["target"] == "v-b" and details["port"] == HOLE and hole["payload"]["severity"] == "critical"
        assert hole["payload"]["source"] in ("v-a", "v-c")  # the prober pages, naming the target
        print(f"hole paged {took_s:.1f} s after it opened (probe interval 5 s +-25%)")

        # b's own drift check stays green (its table is intact), though nft monitor saw both tables come.
        time.sleep(2)
        b_events = [e.get("event") for e in mesh.nodes["b"].log_events()]
        assert "alert.enforce.drift_detected" not in b_events
        assert not [e for e in mesh.received()["events"] if "enforce.drift" in e["dedup_key"]]

        # meshctl status (from any node) shows the hole; meshctl alerts counts the critical alert.
        def hole_in_status() -> bool:
            st = mesh.meshctl_json("a", "status")
            if st is None:
                return False
            vb = {m["node_id"]: m for m in st["cluster_view"]["members"]}["v-b"]["validated"]
            return bool(vb and any(h["port"] == HOLE for h in vb["holes"]))

        wait_until(hole_in_status, 30, "the hole in the signed status view", interval_s=1)
        text = lab.exec("a", [sys.executable, "-m", "meshnode.cli", "status", "--node", f"{lab.addr4['a']}:{MESH}",
                              "--identity", str(cluster.operator)]).stdout.decode()
        line = next(x for x in text.splitlines() if x.strip().startswith("v-b") and "validated from outside" in x)
        assert f"holes: tcp/{HOLE} (seen by v-" in line, text
        print(line)
        wait_until(lambda: ((mesh.meshctl_json("a", "alerts") or {}).get("cluster_alerts") or {}).get("critical", 0) >= 1,
                   30, "the cluster's critical count", interval_s=1)

        # Remove the forward: the next probe of b resolves the page, once.
        lab.exec("b", ["nft", "delete", "table", "ip", "pmtest_hole"])
        wait_until(lambda: mesh.resolves(hole["dedup_key"]), 60, "the resolve")
        time.sleep(6)  # another probe round: nothing more
        keys = [e["dedup_key"] for e in mesh.triggers("enforcement_hole")]
        assert keys.count(hole["dedup_key"]) == 1 and len(mesh.resolves(hole["dedup_key"])) == 1
        assert not mesh.received()["rejected"], mesh.received()["rejected"]

        # A member that dies is one peer_unreachable page (from each peer), resolved when it is back.
        mesh.nodes["c"].stop(timeout_s=1, sig=9)
        pages = wait_until(lambda: [e for e in mesh.triggers("peer_unreachable")
                                    if e["payload"]["custom_details"]["member"] == "v-c"], 90, "peer_unreachable v-c")
        mesh.nodes["c"].start()
        wait_until(lambda: all(mesh.resolves(p["dedup_key"]) for p in pages), 90, "peer_unreachable resolved")
        assert not mesh.received()["rejected"]
    finally:
        for n in mesh.nodes.values():
            if n.alive:
                n.stop(timeout_s=5)
        lab.down()
