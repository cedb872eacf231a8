"""A crowded or failing host must not stop a node: pre-authentication connections are bounded in time
and number, a peer resetting mid-upgrade is a counted refusal in the JSON log, a failed state write is
an alerted, retried error that never stops enforcement or the daemon, and descriptor exhaustion
(RLIMIT_NOFILE) is survived. Real `meshnode` processes, no mocks."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import Cluster, NodeProc, metric_sum, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HANDSHAKES = "policymesh_handshakes_total"
DEADLINE_S = 1.5
MESH_EXTRA = f"\nhandshake_timeout_ms = {int(DEADLINE_S * 1000)}\npreauth_per_source = 4\npreauth_max = 40"


class Mesh:
    def __init__(self, cluster: Cluster, nodes: list[NodeProc]) -> None:
        self.cluster = cluster
        self.nodes = nodes

    def publish_and_converge(self, via: NodeProc | None = None) -> int:
        serial, data = self.cluster.sign()
        reply = self.cluster.publish(via or self.nodes[0], data)
        assert reply["ok"], reply
        self.cluster.wait_serial(serial, self.nodes)
        return serial


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tmp_path_factory.mktemp("resilience"), subnet=71)
    try:
        nodes = [cluster.add_node(f"node-{i + 1}", f"region-{'ab'[i % 2]}", mesh_extra=MESH_EXTRA) for i in range(2)]
        cluster.start(nodes)
        cluster.wait_members(nodes)
        yield Mesh(cluster, nodes)
    finally:
        cluster.close()


def _connect(target: NodeProc, source_ip: str) -> socket.socket:
    s = socket.create_connection((target.ip, target.mesh_port), timeout=5, source_address=(source_ip, 0))
    s.settimeout(0.05)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the node closed (or reset) the connection."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def _json_log_only(node: NodeProc) -> list[str]:
    """Lines of the node's log that are not one JSON object (a plain-text traceback would be)."""
    bad = []
    for line in node.log_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def test_preauth_connections_are_timed_out_from_accept_and_capped_per_source(mesh: Mesh) -> None:
    node = mesh.nodes[0]
    base = node.metrics()
    idle = [_connect(node, "127.66.71.50") for _ in range(2)]  # TCP, no HTTP request at all
    slow = [_connect(node, "127.66.71.51") for _ in range(2)]  # slowloris: a header that never ends
    for s in slow:
        s.sendall(b"GET /mesh HTTP/1.1\r\nHost: x\r\n")
    ws = _connect(node, "127.66.71.52")  # a WebSocket upgrade, then no Noise handshake
    ws.sendall(b"GET /mesh HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    # One source holds at most 4 pending connections: the next ones are closed at accept.
    capped = [_connect(node, "127.66.71.53") for _ in range(7)]
    all_socks = idle + slow + [ws] + capped
    try:
        wait_until(lambda: sum(_closed_by_peer(s) for s in capped) >= 3, DEADLINE_S * 0.8,
                   "connections over the per-source cap refused at accept")
        # Meanwhile an honest operator and the peers are unaffected.
        mesh.publish_and_converge()

        start = time.monotonic()
        pending = list(all_socks)

        def all_closed() -> bool:
            for s in list(pending):
                if s in slow:
                    with contextlib.suppress(OSError):
                        s.sendall(b"X")  # keep dripping header bytes: activity must not extend the deadline
                if _closed_by_peer(s):
                    pending.remove(s)
            return not pending

        wait_until(all_closed, DEADLINE_S + 10, "every pre-auth connection closed", interval_s=0.3)
        assert time.monotonic() - start < DEADLINE_S + 10
    finally:
        for s in all_socks:
            s.close()
    after = node.metrics()
    timeouts = metric_sum(after, HANDSHAKES, result="refused", reason="preauth_timeout") - metric_sum(
        base, HANDSHAKES, result="refused", reason="preauth_timeout")
    limited = metric_sum(after, HANDSHAKES, result="refused", reason="preauth_limit") - metric_sum(
        base, HANDSHAKES, result="refused", reason="preauth_limit")
    assert limited >= 3
    assert timeouts >= 2 + 2 + 4  # idle, slowloris and capped (the WebSocket may end as a handshake timeout)
    assert node.alive
    assert not _json_log_only(node)


def test_a_reset_during_the_websocket_upgrade_is_a_counted_refusal_in_the_json_log(mesh: Mesh) -> None:
    node = mesh.nodes[1]
    request = (b"GET /mesh HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    for i in range(60):
        s = socket.create_connection((node.ip, node.mesh_port), timeout=5,
                                     source_address=(f"127.66.71.{60 + i % 3}", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.sendall(request)
        s.close()
    time.sleep(1.0)
    assert node.alive
    assert not _json_log_only(node), _json_log_only(node)[:20]
    assert "Traceback" not in "\n".join(
        line for line in node.log_text().splitlines() if '"exception"' not in line)
    mesh.publish_and_converge(via=node)


def test_a_failed_state_write_is_alerted_retried_and_never_stops_enforcement(mesh: Mesh) -> None:
    node = mesh.nodes[0]
    policy_dir = node.dir / "state" / "policy"
    saved = node.dir / "policy-dir-saved"
    shutil.move(policy_dir, saved)
    policy_dir.write_bytes(b"not a directory")  # every policy write now fails with an OSError (even as root)
    try:
        serial = mesh.publish_and_converge(via=mesh.nodes[1])  # arrives by gossip: written from the core's path
        assert node.alive
        st = node.status()
        assert st["enforcement"]["applied_serial"] == serial  # enforced although not durable
        wait_until(lambda: any(e.get("event") == "state.write_failed" for e in node.log_events()), 10,
                   "state.write_failed in the log")
        m = node.metrics()
        assert metric_sum(m, "policymesh_state_write_failures_total", kind="policy") >= 1
        assert metric_sum(m, "policymesh_state_unsaved") >= 1
        # A second publish through the node whose disk fails: enforced and gossiped, but not acknowledged
        # (a crash now would lose it); one alert per episode, the daemon keeps going.
        serial2, data = mesh.cluster.sign()
        reply = mesh.cluster.publish(node, data)
        assert reply["ok"] is False and reply["durable"] is False and reply["serial"] == serial2, reply
        assert "not stored durably" in reply["reason"], reply
        mesh.cluster.wait_serial(serial2, mesh.nodes)
        assert metric_sum(node.metrics(), "policymesh_policies_refused_total", reason="not_durable") == 1
        alerts = [e for e in node.log_events() if e.get("event") == "alert.state.write_failed"]
        assert len(alerts) == 1, alerts
        assert alerts[0]["durable"] is False
    finally:
        policy_dir.unlink()
        shutil.move(saved, policy_dir)
    # The retry writes the latest pending policy once the disk works again.
    wait_until(lambda: (policy_dir / f"{serial2}.msgpack").exists(), 40, "the pending policy written on retry")
    wait_until(lambda: any(e.get("event") == "state.write_recovered" for e in node.log_events()), 10,
               "state.write_recovered")
    assert metric_sum(node.metrics(), "policymesh_state_unsaved") == 0
    # And it is durable: a restart boots enforcing it.
    assert node.stop(signal.SIGTERM) == 0
    node.start()
    node.wait_up()
    wait_until(lambda: node.applied_serial() == serial2, 20, "restart enforcing the retried policy")


def _fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_descriptor_exhaustion_is_survived_and_recovered(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "c", subnet=72)
    try:
        extra = f"\nhandshake_timeout_ms = {int(DEADLINE_S * 1000)}"
        a = cluster.add_node("node-1", "region-a", mesh_extra=extra)
        b = cluster.add_node("node-2", "region-b", mesh_extra=extra)
        cluster.start([a])
        b.nofile = _fd_count(a.pid) + 24  # a little room above what a running node needs
        cluster.start([b])
        cluster.wait_members([a, b])
        serial0, data = cluster.sign()
        assert cluster.publish(a, data)["ok"]
        cluster.wait_serial(serial0, [a, b])

        # Hold every descriptor b can get: idle connections from many sources, re-opened as b drops them.
        socks: list[socket.socket] = []
        deadline = time.monotonic() + 3 * DEADLINE_S + 2
        published = False
        serial = 0
        while time.monotonic() < deadline:
            for k in range(40):
                with contextlib.suppress(OSError):
                    socks.append(_connect(b, f"127.66.72.{100 + k % 20}"))
            socks = [s for s in socks if not (_closed_by_peer(s) and s.close() is None)]
            if not published and time.monotonic() > deadline - 2 * DEADLINE_S:
                serial, data = cluster.sign()
                assert cluster.publish(a, data)["ok"]  # gossip to b while b is out of descriptors
                published = True
            assert b.alive, b.log_text()[-3000:]
            time.sleep(0.1)
        for s in socks:
            s.close()
        assert b.alive
        # Recovered: b converges on what was published during the pressure, and on a new version.
        cluster.wait_serial(serial, [a, b], timeout_s=60)
        serial2, data = cluster.sign()
        assert cluster.publish(b, data)["ok"]
        cluster.wait_serial(serial2, [a, b])
        assert not _json_log_only(b), _json_log_only(b)[:20]
    finally:
        cluster.close()
