"""A port scan seen by a real meshnode daemon in a network namespace with real nftables: a non-member
tries 15 dropped ports, the node pages once naming it (strict PagerDuty receiver), blocks it in the
abuse set, and resolves the page after a quiet window."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.daemon_helpers import Cluster, wait_until
from tests.netns import lab_or_skip
from tests.test_validate_netns import MESH, Mesh

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]


def test_port_scan_pages_once_blocks_and_resolves(tmp_path: Path) -> None:
    lab = lab_or_skip("nft")
    cluster = Cluster(tmp_path / "cluster", subnet=123)  # the authority and the operator (no loopback nodes)
    mesh = Mesh(lab, cluster, tmp_path)
    try:
        mesh.start_receiver()
        _, envelope = cluster.sign()
        node = mesh.add_node("a", envelope, [])
        config = node.dir / "node.toml"
        config.write_text(config.read_text() + "port_scan_ports = 10\nport_scan_window_s = 10\nblock_abusers_s = 60\n")
        node.start()
        wait_until(lambda: any(e.get("event") == "policy.applied" for e in node.log_events()), 60, "v-a enforcing")
        a4, c4 = lab.addr4["a"], lab.addr4["c"]

        # c is no member: 15 closed ports, all dropped by the default.
        t0 = time.time()
        assert lab.probe("c", [(a4, p) for p in range(21001, 21016)], timeout=0.5) == ["timeout"] * 15
        pages = wait_until(lambda: mesh.triggers("port_scan"), 60, "the port_scan page")
        print(f"port scan paged {time.time() - t0:.1f} s after it (sets listed every 10 s)")
        page = pages[0]
        details = page["payload"]["custom_details"]
        assert details["source"] == c4 and details["ports"] == 15 and page["payload"]["source"] == "v-a"
        assert page["payload"]["severity"] == "warning" and page["dedup_key"].endswith(f"/port_scan/{c4}")

        # Blocked in the abuse set (it is no member): now even the mesh port is dropped for it.
        wait_until(lambda: c4 in lab.exec("a", ["nft", "list", "set", "inet", "policymesh", "abusers_v4"])
                   .stdout.decode(), 30, "c in the block set")
        assert any(e.get("event") == "checks.source_blocked" and e.get("source") == c4 for e in node.log_events())
        # The recorded and blocked elements are not drift.
        assert not [e for e in node.log_events() if e.get("event") == "alert.enforce.drift_detected"]

        # Quiet (blocked, so nothing is recorded) for a window and more: one resolve; one trigger in all.
        wait_until(lambda: mesh.resolves(page["dedup_key"]), 90, "the resolve")
        assert len(mesh.triggers("port_scan")) == 1 and len(mesh.resolves(page["dedup_key"])) == 1
        assert not mesh.received()["rejected"], mesh.received()["rejected"]
        assert lab.probe("c", [(a4, MESH)]) == ["timeout"]  # still blocked (60 s)
    finally:
        for n in mesh.nodes.values():
            if n.alive:
                n.stop(timeout_s=5)
        lab.down()
