"""Alerts of a real daemon through the pipeline, received by the strict PagerDuty Events v2 / webhook
receiver (tests/pagerduty_receiver.py) running in a thread of its own."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from protocol.trust import decode_envelope, encode_envelope
from tests.daemon_helpers import MESHCTL, Cluster, NodeProc, metric_sum, run_cli, wait_until
from tests.pagerduty_receiver import Receiver, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"  # 32 characters, like a PagerDuty integration key


class ThreadedReceiver:
    """The strict receiver on its own event loop in a thread; it can be stopped and started again on the
    same port (a receiver that is down for a while)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.receiver = Receiver(port=free_port())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> ThreadedReceiver:
        self._call(self.receiver.start())
        return self

    def stop(self) -> None:
        self._call(self.receiver.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def events(self, check: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.receiver.events)
                if check is None or e.get("payload", {}).get("class") == check or f"/{check}/" in e["dedup_key"]
                or e["dedup_key"].endswith(f"/{check}")]


@pytest.fixture
def receiver() -> Iterator[ThreadedReceiver]:
    r = ThreadedReceiver().start()
    try:
        yield r
    finally:
        r.close()


def wire_alerts(node: NodeProc, receiver: ThreadedReceiver, *, drift_check_s: float = 30) -> None:
    key = node.dir / "pagerduty.key"
    key.write_text(ROUTING_KEY + "\n")
    os.chmod(key, 0o600)
    text = node.config.read_text().replace("drift_check_s = 30", f"drift_check_s = {drift_check_s}")
    node.config.write_text(text + f'\n[alerts]\npagerduty_routing_key_file = "pagerduty.key"\n'
                           f'pagerduty_url = "{receiver.receiver.pagerduty_url}"\n'
                           f'webhook_urls = ["{receiver.receiver.webhook_url}"]\n')


def forge(cluster: Cluster) -> bytes:
    _, data = cluster.sign()
    env = decode_envelope(data, "policy")
    return encode_envelope(type(env)(type="policy", payload=env.payload[:-1] + b"\x00", signatures=env.signatures))


def open_alerts(node: NodeProc) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://{node.ip}:{node.admin_port}/v1/alerts", timeout=3) as resp:
        return list(json.loads(resp.read())["alerts"])


def test_forged_policy_pages_once_through_pagerduty_and_webhook(tmp_path: Path, receiver: ThreadedReceiver) -> None:
    cluster = Cluster(tmp_path, subnet=90)
    try:
        node = cluster.add_node("alert-1", "region-a")
        wire_alerts(node, receiver)
        cluster.start([node])
        assert not cluster.publish(node, forge(cluster))["ok"]
        wait_until(lambda: receiver.events("policy.rejected"), 20, "PagerDuty trigger")
        wait_until(lambda: any(w["check"] == "policy.rejected" for w in receiver.receiver.webhooks), 20, "webhook")
        event = receiver.events("policy.rejected")[0]
        assert event["event_action"] == "trigger" and event["routing_key"] == ROUTING_KEY
        assert event["payload"]["custom_details"]["source"].startswith("operator:")
        assert not receiver.receiver.rejected, receiver.receiver.rejected
        assert [a["check"] for a in open_alerts(node)] == ["policy.rejected"]
        js = run_cli([*MESHCTL, "alerts", "--node", node.mesh, "--identity", str(cluster.operator), "--json"])
        assert js.returncode == 0, js.stderr
        view = json.loads(js.stdout)
        assert [a["check"] for a in view["alerts"]] == ["policy.rejected"]
        assert [m["node_id"] for m in view["members"]] == ["alert-1"]
        text = run_cli([*MESHCTL, "alerts", "--node", node.mesh, "--identity", str(cluster.operator)])
        assert "1 open alert(s)" in text.stdout and "policy.rejected" in text.stdout, text.stdout + text.stderr
        assert len([e for e in receiver.events("policy.rejected") if e["event_action"] == "trigger"]) == 1
        assert any(name == "policymesh_alerts_total" and ("event", "policy.rejected") in labels and v >= 1
                   for (name, labels), v in node.metrics().items())
        assert any(name == "policymesh_alerts_open" and ("check", "policy.rejected") in labels and v == 1
                   for (name, labels), v in node.metrics().items())
    finally:
        cluster.close()


def test_tampered_ruleset_is_one_trigger_and_one_resolve(tmp_path: Path, receiver: ThreadedReceiver) -> None:
    cluster = Cluster(tmp_path, subnet=91)
    try:
        node = cluster.add_node("alert-1", "region-a")
        wire_alerts(node, receiver, drift_check_s=0.5)
        cluster.start([node])
        serial, data = cluster.sign()
        assert cluster.publish(node, data)["ok"]
        cluster.wait_serial(serial, [node])
        ruleset = node.dir / "ruleset.nft"
        wait_until(ruleset.exists, 10, "ruleset file")
        ruleset.write_text(ruleset.read_text() + "\n# tampered by hand\n")
        wait_until(lambda: [e["event_action"] for e in receiver.events("enforce.drift")] == ["trigger", "resolve"],
                   20, "drift trigger then resolve")
        assert "tampered" not in ruleset.read_text()  # repaired
        trigger, resolve = receiver.events("enforce.drift")
        assert trigger["dedup_key"] == resolve["dedup_key"] and trigger["payload"]["severity"] == "critical"
        # Nothing more while the ruleset stays intact (a few more drift ticks).
        time.sleep(2)
        assert len(receiver.events("enforce.drift")) == 2
        assert not any(a["check"] == "enforce.drift" for a in open_alerts(node))
        samples = node.metrics()
        assert metric_sum(samples, "policymesh_convergence_lag") == 0  # enforces what it trusts
        assert metric_sum(samples, "policymesh_peers", state="connected") == 0  # alone in its cluster
        assert metric_sum(samples, "policymesh_drift_repairs_total") >= 1
        assert not receiver.receiver.rejected, receiver.receiver.rejected
    finally:
        cluster.close()


def test_alert_raised_while_receiver_is_down_survives_a_restart(tmp_path: Path, receiver: ThreadedReceiver) -> None:
    cluster = Cluster(tmp_path, subnet=92)
    try:
        node = cluster.add_node("alert-1", "region-a")
        wire_alerts(node, receiver)
        receiver.stop()
        cluster.start([node])
        assert not cluster.publish(node, forge(cluster))["ok"]
        wait_until(lambda: any(e.get("event") == "alert.policy.rejected" for e in node.log_events()), 20,
                   "alert logged")
        assert node.stop() == 0  # flushed to the outbox at shutdown (and durable before already)
        receiver.start()
        node.start()
        wait_until(lambda: receiver.events("policy.rejected"), 30, "delivered after the restart")
        wait_until(lambda: any(w["check"] == "policy.rejected" for w in receiver.receiver.webhooks), 30, "webhook")
        time.sleep(1)
        assert len(receiver.events("policy.rejected")) == 1
        assert not receiver.receiver.rejected, receiver.receiver.rejected
    finally:
        cluster.close()


@pytest.mark.root
def test_nft_flush_ruleset_is_repaired_at_once_without_waiting_for_the_timer(tmp_path: Path) -> None:
    """A real daemon in its own network namespace with real nftables and drift_check_s = 3600: a flush
    of the ruleset by hand (what an nftables.service reload does) is seen by ``nft monitor`` and repaired
    within a couple of seconds."""
    import secrets
    import subprocess

    from tests.netns import skip_reason

    reason = skip_reason("nft")
    if reason:
        pytest.skip(reason)
    ns = f"pmt-wire-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    cluster = Cluster(tmp_path, subnet=93)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        node = cluster.add_node("nft-1", "region-a", sources='drop_dir = "drop"')
        text = node.config.read_text().replace('backend = "file"', 'backend = "nftables"')
        node.config.write_text(text.replace("drift_check_s = 30", "drift_check_s = 3600"))
        (node.dir / "drop").mkdir()
        _, data = cluster.sign()
        (node.dir / "drop" / "policy.signed").write_bytes(data)
        node.wrapper = ["ip", "netns", "exec", ns]
        node.start()

        def table_loaded() -> bool:
            out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "policymesh"],
                                 capture_output=True, text=True)
            return out.returncode == 0 and "chain" in out.stdout

        wait_until(lambda: any(e.get("event") == "policy.applied" for e in node.log_events()), 30, "applied")
        wait_until(lambda: any(e.get("event") == "ruleset_watch.started" for e in node.log_events()), 10, "watch")
        assert table_loaded()
        flushed_at = time.monotonic()
        subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True)
        wait_until(lambda: any(e.get("event") == "alert.enforce.drift_repaired" for e in node.log_events()), 5,
                   "drift repaired on the monitor's event")
        took_s = time.monotonic() - flushed_at
        assert table_loaded()
        events = [e.get("event") for e in node.log_events()]
        assert events.count("alert.enforce.drift_detected") == 1 and events.count("alert.enforce.drift_repaired") == 1
        print(f"flush ruleset -> repaired in {took_s:.2f} s (drift_check_s = 3600)")
    finally:
        cluster.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_handshake_flood_from_one_source_is_one_abuse_alert(tmp_path: Path, receiver: ThreadedReceiver) -> None:
    """Hundreds of failed handshakes from one source open one abuse episode: one trigger, not one per
    attempt (the abuse check of meshnode/checks, fed by the mesh listener)."""
    from tests.daemon_helpers import raw_ws_send

    cluster = Cluster(tmp_path, subnet=94)
    try:
        node = cluster.add_node("abused-1", "region-a")
        wire_alerts(node, receiver)
        node.config.write_text(node.config.read_text() + "\n[validate]\nabuse_threshold = 5\nabuse_window_s = 60\n")
        cluster.start([node])

        async def flood() -> None:
            for _ in range(60):  # garbage instead of a Noise handshake (or a 429 once rate-limited): each
                try:               # one a failed or refused handshake
                    await raw_ws_send(node.mesh, [b"\x00" * 64], wait_s=0.5)
                except aiohttp.ClientError:
                    pass

        asyncio.run(flood())
        wait_until(lambda: receiver.events("handshake_abuse"), 30, "the abuse trigger")
        time.sleep(2.0)
        triggers = [e for e in receiver.events("handshake_abuse") if e["event_action"] == "trigger"]
        assert len(triggers) == 1, triggers
        assert triggers[0]["payload"]["severity"] in ("warning", "error", "critical")
        assert node.alive
        assert any(a["check"] == "handshake_abuse" for a in open_alerts(node))
    finally:
        cluster.close()
