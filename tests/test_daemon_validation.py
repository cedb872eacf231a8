"""External validation through real daemons on loopback, without root: the file backend (the labelled
override) enforces nothing, so a listener on a port the policy refuses is a hole that a peer's probe finds
and pages through the strict PagerDuty receiver, shows in the signed status view, and resolves once the
listener is gone. (tests/test_validate_netns.py does the same against real nftables as root.)"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import Cluster, wait_until
from tests.test_daemon_alerts import ThreadedReceiver, receiver, wire_alerts  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_hole_is_paged_by_the_peer_and_resolved(tmp_path: Path, receiver: ThreadedReceiver) -> None:  # noqa: F811
    cluster = Cluster(tmp_path, subnet=97)
    listener = socket.socket()
    try:
        a = cluster.add_node("val-a", "region-a", role="web")
        b = cluster.add_node("val-b", "region-a", role="db")
        listener.bind((b.ip, 0))
        hole = listener.getsockname()[1]
        for n in (a, b):
            wire_alerts(n, receiver)
            n.config.write_text(n.config.read_text() + "\n[validate]\nport_audit_s = 0\npeer_probe_interval_s = 5\n"
                                f"peer_probe_refused = 16\npeer_probe_timeout_s = 1\npeer_probe_ports = [{hole}]\n")
        cluster.start()
        cluster.wait_members()
        serial, data = cluster.sign()
        assert cluster.publish(a, data)["ok"]
        cluster.wait_serial(serial)

        # Nothing listens yet: probes of each other, no hole.
        wait_until(lambda: any(e.get("event") == "validate.peer_probed" and e.get("target") == "val-b"
                               for e in a.log_events()), 30, "a probing b")
        assert not receiver.events("enforcement_hole")

        listener.listen(16)  # the kernel completes handshakes from the backlog: the port is open
        opened = time.monotonic()
        wait_until(lambda: receiver.events("enforcement_hole"), 60, "the hole page")
        print(f"hole paged {time.monotonic() - opened:.1f} s after the listener opened (interval 5 s +-25%)")
        trigger = receiver.events("enforcement_hole")[0]
        assert trigger["event_action"] == "trigger" and trigger["payload"]["source"] == "val-a"
        assert trigger["payload"]["custom_details"]["target"] == "val-b"
        assert trigger["payload"]["custom_details"]["port"] == hole

        def b_validated() -> dict | None:  # type: ignore[type-arg]
            st = a.status()
            if st is None:
                return None
            return {m["node_id"]: m for m in st["cluster_view"]["members"]}["val-b"]["validated"]

        v = wait_until(lambda: (b_validated() or {}).get("holes"), 30, "the hole in a's status view")
        assert v == [{"port": hole, "by": "val-a", "at": v[0]["at"]}]
        wait_until(lambda: (b.status() or {}).get("cluster_view", {}).get("alerts", {}).get("critical", 0) >= 1,
                   30, "the critical alert counted in b's view of the cluster (a's signed status)")

        listener.close()
        wait_until(lambda: [e for e in receiver.events() if e["event_action"] == "resolve"
                            and e["dedup_key"] == trigger["dedup_key"]], 60, "the resolve")
        time.sleep(6)
        assert [e["event_action"] for e in receiver.events() if e["dedup_key"] == trigger["dedup_key"]] == [
            "trigger", "resolve"]
        assert not receiver.receiver.rejected
    finally:
        listener.close()
        cluster.close()
