"""SIGHUP on a real daemon: a bad config keeps the running one; a good one is taken, overrides included."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.daemon_helpers import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_sighup_reload(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=41)
    try:
        node = cluster.add_node("hup-1", "region-a")
        cluster.start([node])
        serial, data = cluster.sign()
        assert cluster.publish(node, data)["ok"]
        cluster.wait_serial(serial, [node])
        good = node.config.read_text()

        node.config.write_text(good + "\n[mesh]\nbogus = 1\n")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e.get("event") == "config.reload_failed" for e in node.log_events()), 20,
                   "config.reload_failed")
        assert node.alive and node.applied_serial() == serial

        node.config.write_text(good.replace("break_glass_cidrs = []", 'break_glass_cidrs = ["192.0.2.0/24"]'))
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e.get("event") == "config.reloaded" for e in node.log_events()), 20,
                   "config.reloaded")
        st = node.status()
        assert st is not None and "break_glass_cidrs" in st["overrides"]
        metrics = node.metrics()
        assert any(name == "policymesh_override_active" and ("override", "break_glass_cidrs") in labels and v == 1
                   for (name, labels), v in metrics.items())
        assert node.alive and node.applied_serial() == serial
    finally:
        cluster.close()
