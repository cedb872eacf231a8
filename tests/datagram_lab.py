"""Run inside a network namespace whose nftables drop every UDP packet from or to one node's address
(tests/test_daemon_datagrams.py starts it with ``ip netns exec``): three real daemons, three publishes
(one through the UDP-blocked node); prints the nodes' applied serials and datagram status as JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.daemon_helpers import Cluster, wait_until

SUBNET = 172
BLOCKED = 2  # index of the node whose UDP is dropped


def main(root: Path) -> dict:
    cluster = Cluster(root, SUBNET)
    try:
        nodes = [cluster.add_node(f"dg-{i}", "region-a") for i in range(3)]
        cluster.start(nodes)
        cluster.wait_members(nodes)
        serials = []
        for via in (nodes[0], nodes[BLOCKED], nodes[1]):
            serial, data = cluster.sign()
            assert cluster.publish(via, data)["ok"]
            cluster.wait_serial(serial, nodes)
            serials.append(serial)
        blocked = nodes[BLOCKED].node_id

        def settled() -> bool:  # the probes of every path have been answered or given up
            st = {n.node_id: n.status()["datagrams"] for n in nodes}
            return all(set(st[n.node_id]["peers_datagram"]) | set(st[n.node_id]["peers_stream_only"])
                       == {m.node_id for m in nodes} - {n.node_id} for n in nodes) and \
                all(blocked in st[n.node_id]["peers_stream_only"] for n in nodes if n.node_id != blocked)

        wait_until(settled, 30, "datagram paths settled", interval_s=0.2)
        time.sleep(0.5)
        return {"published": serials, "blocked": blocked,
                "applied": {n.node_id: n.applied_serial() for n in nodes},
                "datagrams": {n.node_id: n.status()["datagrams"] for n in nodes}}
    finally:
        cluster.close()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
