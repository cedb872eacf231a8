"""The daemon as operators run it: real `meshnode` processes on loopback, no mocks.

Every test drives nodes only through their mesh port (operator channel, hostile peers), their admin
listener (/healthz /readyz /v1/status /metrics), signals, files and the command line. Deadlines are
generous guards against hanging; assertions are about behaviour, never speed.

Addresses: 127.66.<subnet>.<n>, ports 24600 + 24 * subnet (see tests/daemon_helpers.py); the demo test
uses 127.0.0.10+ with ports from 28400.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from meshnode.sources import drop_file
from protocol.trust import Envelope, decode_envelope, encode_envelope
from tests.daemon_helpers import (
    MESHCTL,
    MESHNODE,
    Cluster,
    NodeProc,
    metric_sum,
    open_session,
    raw_ws_send,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

HANDSHAKES = "policymesh_handshakes_total"
FRAMES_REFUSED = "policymesh_frames_refused_total"
POLICIES_REFUSED = "policymesh_policies_refused_total"


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


# -- a shared four-node mesh in two regions --------------------------------------------------------


class Mesh:
    def __init__(self, cluster: Cluster, core: list[NodeProc]) -> None:
        self.cluster = cluster
        self.core = core

    def publish_and_converge(self, via: NodeProc | None = None, extra: str = "") -> int:
        serial, data = self.cluster.sign(extra)
        reply = self.cluster.publish(via or self.core[0], data)
        assert reply["ok"], reply
        assert reply["serial"] == serial
        self.cluster.wait_serial(serial, self.core)
        return serial


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tmp_path_factory.mktemp("mesh"), subnet=1)
    try:
        core = [cluster.add_node(f"node-{i + 1}", f"region-{'ab'[i % 2]}") for i in range(4)]
        cluster.start(core)
        cluster.wait_members(core)
        yield Mesh(cluster, core)
    finally:
        cluster.close()


@pytest.mark.slow
def test_four_nodes_in_two_regions_converge_on_each_published_version(mesh: Mesh) -> None:
    for via in (mesh.core[0], mesh.core[3]):  # publish through a node in each region
        serial = mesh.publish_and_converge(via)
        for n in mesh.core:
            st = n.status()
            assert st is not None
            assert st["enforcement"]["applied_serial"] == serial
            assert st["policy"]["serial"] == serial
            assert st["policy"]["state"] == "fresh"
            got = n.admin("/readyz")
            assert got is not None and got[0] == 200, got
        # Every node enforces the same policy: one policy hash across the mesh.
        assert len({n.status()["policy"]["hash"] for n in mesh.core}) == 1


@pytest.mark.slow
def test_meshctl_status_shows_every_member_and_the_serial(mesh: Mesh) -> None:
    serial = mesh.publish_and_converge()
    ids = {n.node_id for n in mesh.core}
    via = mesh.core[1]

    # The cluster view is gossiped: wait until the node has heard every member's applied serial.
    def all_reported() -> bool:
        st = via.status()
        return st is not None and all(
            m["serial"] == serial for m in st["cluster_view"]["members"] if m["node_id"] in ids
        ) and ids <= {m["node_id"] for m in st["cluster_view"]["members"]}

    wait_until(all_reported, 30, "every member's serial in the cluster view", interval_s=0.2)

    table = run_cli([*MESHCTL, "status", "--node", via.mesh, "--identity", str(mesh.cluster.operator)])
    _no_traceback(table)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"node {via.node_id} ")
    assert f"enforcing serial {serial}" in lines[0]
    for n in mesh.core:
        row = [ln for ln in lines[1:] if ln.split()[1:2] == [n.node_id]]
        assert len(row) == 1, (n.node_id, table.stdout)
        cols = row[0].split()
        assert cols[0] == n.region and cols[2] == "alive" and int(cols[3]) == serial and cols[-1] == "yes", row
    assert f"{len(ids)}/{len(ids)} members enforce serial {serial}" in table.stdout

    js = run_cli([*MESHCTL, "status", "--node", via.mesh, "--identity", str(mesh.cluster.operator), "--json"])
    _no_traceback(js)
    assert js.returncode == 0, js.stderr
    st = json.loads(js.stdout)
    assert st["node"] == via.node_id
    assert st["enforcement"]["applied_serial"] == serial
    members = {m["node_id"]: m for m in st["cluster_view"]["members"]}
    assert ids <= set(members)
    assert all(members[i]["serial"] == serial for i in ids)
    assert st["cluster_view"]["convergence"]["converged"] == len(ids)

    # A node's status needs an operator: a node identity cannot open an operator channel.
    bad = run_cli([*MESHCTL, "status", "--node", via.mesh, "--identity", str(mesh.core[0].dir)])
    _no_traceback(bad)
    assert bad.returncode != 0


@pytest.mark.slow
def test_forged_unsigned_and_foreign_policies_are_refused_with_a_reason(mesh: Mesh, tmp_path: Path) -> None:
    held = mesh.publish_and_converge()
    via = mesh.core[0]
    before = metric_sum(via.metrics(), POLICIES_REFUSED)
    serial, good = mesh.cluster.sign()  # signed, never published as is
    env = decode_envelope(good, "policy")

    other = Cluster(tmp_path / "other", subnet=20, cluster=mesh.cluster.name)  # same cluster name, other keys
    _, foreign = other.sign()
    stranger = Cluster(tmp_path / "stranger", subnet=21, cluster="another-cluster")
    _, foreign_cluster = stranger.sign()

    # Altered payload, signatures kept: flip one byte inside the payload.
    payload = bytearray(env.payload)
    payload[len(payload) // 2] ^= 0x01
    forged = encode_envelope(Envelope(type="policy", payload=bytes(payload), signatures=env.signatures))
    unsigned = encode_envelope(Envelope(type="policy", payload=env.payload, signatures=()))
    cases = {
        "forged": (forged, ("signature", "malformed", "not a signed")),
        "unsigned": (unsigned, ("signature",)),
        "other-authority": (foreign, ("signature",)),
        "other-cluster": (foreign_cluster, ("signature", "cluster")),
        "junk": (os.urandom(300), ("malformed", "not a signed")),
        "not-a-policy": (msgspec.msgpack.encode({"type": "cert", "payload": b"x", "signatures": []}),
                         ("not a signed", "expected a signed policy", "malformed")),
    }
    for name, (data, words) in cases.items():
        f = tmp_path / f"{name}.msgpack"
        f.write_bytes(data)
        proc = run_cli([*MESHCTL, "policy", "publish", str(f), "--node", via.mesh,
                        "--identity", str(mesh.cluster.operator)])
        _no_traceback(proc)
        assert proc.returncode != 0, (name, proc.stdout)
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert f"refused by {via.mesh}" in err, (name, err)
        assert any(w in err.lower() for w in words), (name, err)

    # An operator certificate from another authority cannot even open the channel.
    f = tmp_path / "good.msgpack"
    f.write_bytes(good)
    proc = run_cli([*MESHCTL, "policy", "publish", str(f), "--node", via.mesh, "--identity", str(other.operator)])
    _no_traceback(proc)
    assert proc.returncode != 0 and proc.stderr.startswith("meshctl: error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    # Nothing changed anywhere, and every refusal was counted.
    assert all(n.status()["policy"]["serial"] == held for n in mesh.core)
    assert metric_sum(via.metrics(), POLICIES_REFUSED) >= before + len(cases)
    # The signed one is still good afterwards (nothing above poisoned the node's state).
    proc = run_cli([*MESHCTL, "policy", "publish", str(f), "--node", via.mesh, "--identity", str(mesh.cluster.operator)])
    assert proc.returncode == 0, proc.stderr
    assert f"serial {serial}" in proc.stdout
    mesh.cluster.wait_serial(serial, mesh.core)


def _refused(node: NodeProc, reason: str | None = None) -> float:
    samples = node.metrics()
    labels = {"result": "refused"} | ({"reason": reason} if reason else {})
    return metric_sum(samples, HANDSHAKES, **labels)


@pytest.mark.slow
def test_hostile_bytes_on_the_websocket_are_refused_and_counted(mesh: Mesh) -> None:
    target = mesh.core[2]
    before_hs = _refused(target)

    # Not a Noise message at all, then a text frame, then an oversize binary frame.
    got = asyncio.run(raw_ws_send(target.mesh, [os.urandom(100)]))
    assert got and got[-1].type.name in ("CLOSE", "CLOSED"), got
    asyncio.run(raw_ws_send(target.mesh, ["GET /secrets"]))
    got = asyncio.run(raw_ws_send(target.mesh, [os.urandom(70_000)]))
    assert got and got[-1].type.name == "CLOSE" and got[-1].data == 1009, got  # message too big
    # A valid first message (an ephemeral key), then garbage instead of message 3.
    asyncio.run(raw_ws_send(target.mesh, [os.urandom(32), os.urandom(200)]))
    wait_until(lambda: _refused(target) >= before_hs + 4, 10, "four refused handshakes")
    assert _refused(target, "oversize_frame") >= 1
    assert _refused(target, "decrypt") >= 1

    # An authenticated peer (real keys of a member) that then breaks the channel: garbage, then an
    # oversize frame. Each costs that connection only, and is counted as a refused frame.
    peer_dir = mesh.core[0].dir
    before_frames = metric_sum(target.metrics(), FRAMES_REFUSED)

    async def authenticated_then(payload: bytes) -> int | None:
        ws, _session, http = await open_session(target.mesh, peer_dir)
        try:
            await ws.send_bytes(payload)
            msg = await asyncio.wait_for(ws.receive(), 10)
            return msg.data if msg.type.name == "CLOSE" else None
        finally:
            await ws.close()
            await http.close()

    asyncio.run(authenticated_then(os.urandom(100)))
    assert asyncio.run(authenticated_then(os.urandom(70_000))) == 1009

    async def authenticated_message(message: bytes) -> None:
        ws, session, http = await open_session(target.mesh, peer_dir)
        try:
            for frame in session.send_message(message):
                await ws.send_bytes(frame)
            await asyncio.wait_for(ws.receive(), 10)  # the node drops this connection
        finally:
            await ws.close()
            await http.close()

    # A well-encrypted gossip frame whose string holds invalid UTF-8 (used to crash the node's task group).
    from protocol.gossip.wire import Ping, encode

    before_alerts = metric_sum(target.metrics(), "policymesh_alerts_total", event="gossip.remote_error")
    asyncio.run(authenticated_message(encode(Ping(1, "node-a")).replace(b"node-a", b"node-\x80")))
    # Refused as the peer's protocol error (alert + disconnect), not an exception escaping the handler.
    wait_until(lambda: metric_sum(target.metrics(), "policymesh_alerts_total", event="gossip.remote_error")
               > before_alerts, 10, "the malformed frame blamed on the peer")
    assert target.alive and "UnicodeDecodeError" not in target.log_text()
    wait_until(lambda: metric_sum(target.metrics(), FRAMES_REFUSED) >= before_frames + 2, 10, "two refused frames")
    assert metric_sum(target.metrics(), FRAMES_REFUSED, reason="oversize_frame") >= 1
    assert metric_sum(target.metrics(), FRAMES_REFUSED, reason="decrypt") >= 1

    # The node and the mesh carry on.
    assert target.alive
    mesh.publish_and_converge(via=target)


@pytest.mark.slow
def test_foreign_revoked_and_expired_peers_are_refused_while_the_mesh_carries_on(
    mesh: Mesh, tmp_path: Path
) -> None:
    cluster = mesh.cluster
    a, b = mesh.core[0], mesh.core[1]
    revoked = cluster.add_node("revoked-1", "region-a", seeds=[a, b])
    expired = cluster.add_node("expired-1", "region-b", seeds=[a, b], valid="1s")
    serial = mesh.publish_and_converge(extra='\n[revoke]\nnodes = ["revoked-1"]\n')

    stranger = Cluster(tmp_path / "stranger", subnet=22, cluster="stranger-mesh")
    rogue = stranger.add_node("rogue-1", "region-a", seeds=[a, b])
    try:
        before = {n.node_id: (_refused(n, "revoked"), _refused(n, "expired"), _refused(n)) for n in (a, b)}
        time.sleep(2.5)  # expired-1's certificate was valid for 1 s (the mesh tolerates 1 s of skew)
        for n in (revoked, expired, rogue):
            n.start()
        for n in (revoked, expired, rogue):
            n.wait_up()

        def counted() -> bool:
            now = {n.node_id: (_refused(n, "revoked"), _refused(n, "expired"), _refused(n)) for n in (a, b)}
            return (sum(now[i][0] - before[i][0] for i in now) >= 1
                    and sum(now[i][1] - before[i][1] for i in now) >= 1
                    and sum(now[i][2] - before[i][2] for i in now) >= 3)

        wait_until(counted, 30, "revoked, expired and foreign handshakes refused", interval_s=0.2)

        # The mesh carries on without them: a later version converges on every member, and none of
        # the refused peers ever became a member or received a policy.
        serial = mesh.publish_and_converge(via=b, extra='\n[revoke]\nnodes = ["revoked-1"]\n')
        time.sleep(1.0)
        for n in mesh.core:
            members = {m["node_id"] for m in n.status()["cluster_view"]["members"]}
            assert not members & {"revoked-1", "expired-1", "rogue-1"}, (n.node_id, members)
            assert n.status()["enforcement"]["applied_serial"] == serial
        for n in (revoked, expired, rogue):
            assert n.alive
            assert n.applied_serial() == 0, n.node_id
            assert n.status()["connections"]["gossip"] == 0, n.node_id
        # The refused nodes are told why (a WebSocket close carrying the reason label) and log it.
        for n, why in ((revoked, "revoked"), (expired, "expired")):
            wait_until(lambda n=n, why=why: any(e.get("event") == "peer.refused_us" and e.get("reason") == why
                                                for e in n.log_events()), 20, f"{n.node_id} told it is {why}")
    finally:
        for n in (revoked, expired, rogue):
            n.stop(signal.SIGKILL)


# -- restarts, crashes and signals -----------------------------------------------------------------


@pytest.mark.slow
def test_a_restarted_node_enforces_its_stored_policy_with_no_peer_reachable(tmp_path: Path) -> None:
    # The peer list is persisted quickly here, so that restarts also read it back.
    cluster = Cluster(tmp_path, subnet=11, gossip={"sync_interval_ms": 1000, "cross_region_sync_interval_ms": 2000,
                                                   "peers_persist_interval_ms": 200})
    try:
        nodes = [cluster.add_node(f"node-{i + 1}", f"region-{'ab'[i % 2]}") for i in range(3)]
        cluster.start()
        cluster.wait_members()
        last = 0
        for via in nodes[:2]:
            last, data = cluster.sign()
            assert cluster.publish(via, data)["ok"]
            cluster.wait_serial(last)
        wait_until(lambda: all((n.dir / "state" / "directory.msgpack").exists() for n in nodes), 20,
                   "member files saved")
        for n in nodes:
            assert n.stop() == 0

        lone = nodes[2]  # it never talked to an operator: it learnt every version by gossip
        lone.start()
        lone.wait_up()
        wait_until(lambda: (lone.admin("/readyz") or (0,))[0] == 200, 20, "/readyz")
        code, text = lone.admin("/readyz")
        assert code == 200 and f"serial {last}" in text
        st = lone.status()
        assert st["enforcement"]["applied_serial"] == last
        assert st["policy"]["serial"] == last and st["policy"]["state"] == "fresh"
        assert st["connections"]["gossip"] == 0  # nobody to talk to
        assert metric_sum(lone.metrics(), "policymesh_state_problems_total") == 0  # its saved state read back
        assert not any(n.alive for n in nodes[:2])
        # The ruleset file the (file) backend rendered is there too.
        assert (lone.dir / "ruleset.nft").read_text().strip()

        # A corrupt member file is reported, not fatal: the node still starts and enforces.
        broken = nodes[0]
        (broken.dir / "state" / "directory.msgpack").write_bytes(b"\x93garbage")
        broken.start()
        broken.wait_up()
        wait_until(lambda: broken.applied_serial() == last, 20, "the node with a corrupt peer list enforcing")
        assert metric_sum(broken.metrics(), "policymesh_state_problems_total") >= 1

        # A node with no stored policy is alive but not ready.
        fresh = cluster.add_node("node-new", "region-a", seeds=[nodes[1]])  # a stopped seed
        fresh.start()
        fresh.wait_up()
        code, _ = fresh.admin("/readyz")
        assert code == 503
    finally:
        cluster.close()


@pytest.mark.slow
def test_kill9_right_after_an_acknowledged_publish_loses_nothing(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=12)
    try:
        a = cluster.add_node("node-1", "region-a")
        b = cluster.add_node("node-2", "region-b")
        cluster.start()
        cluster.wait_members()
        # Round 1: the node is busy gossiping the new version to its peer when it dies.
        serial, data = cluster.sign()
        reply = cluster.publish(a, data)
        a.kill9()
        assert reply["ok"] and reply["serial"] == serial, reply
        b.kill9()  # nobody can hand the version back to a
        for _ in range(3):
            a.start()
            a.wait_up()
            wait_until(lambda s=serial: a.applied_serial() >= s, 20, f"serial {serial} after restart")
            assert a.applied_serial() == serial
            assert a.status()["policy"]["serial"] == serial
            # Next round: alone, publish and kill as soon as the operator has the acknowledgement.
            serial, data = cluster.sign()
            reply = cluster.publish(a, data)
            a.kill9()
            assert reply["ok"] and reply["serial"] == serial, reply
        a.start()
        a.wait_up()
        wait_until(lambda: a.applied_serial() >= serial, 20, f"serial {serial} after restart")
        assert a.applied_serial() == serial
        # b comes back and catches up from a.
        b.start()
        cluster.wait_serial(serial, [b])
    finally:
        cluster.close()


@pytest.mark.slow
def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=13)
    try:
        a = cluster.add_node("node-1", "region-a")
        b = cluster.add_node("node-2", "region-b")
        cluster.start()
        cluster.wait_members()
        serial, data = cluster.sign()
        assert cluster.publish(a, data)["ok"]
        cluster.wait_serial(serial)

        async def stalled_handshake_then_sigterm() -> int | None:
            # A peer that opens a WebSocket and never finishes the handshake must not hold up shutdown.
            import aiohttp

            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"http://{a.mesh}/mesh") as ws:
                    await ws.send_bytes(os.urandom(32))  # a valid first message; then silence
                    await asyncio.sleep(0.3)
                    a.proc.send_signal(signal.SIGTERM)
                    return await asyncio.to_thread(a.proc.wait, 10)  # "within a few seconds", generously

        rc = asyncio.run(stalled_handshake_then_sigterm())
        assert rc == 0
        events = [e.get("event") for e in a.log_events()]
        assert "meshnode.stopping" in events and events[-1] == "meshnode.stopped", events[-5:]
        assert "Traceback" not in a.log_text()
        # The peer saw it leave (a graceful stop announces itself), and keeps running.
        wait_until(lambda: any(m["node_id"] == "node-1" and m["liveness"] in ("left", "dead", "suspect")
                               for m in b.status()["cluster_view"]["members"]), 20, "node-1 gone in b's view")
        assert b.alive
        assert b.stop() == 0
        assert b.log_events()[-1]["event"] == "meshnode.stopped"
        # SIGINT is a clean stop too.
        a.start()
        a.wait_up()
        a.proc.send_signal(signal.SIGINT)
        assert a.proc.wait(20) == 0
    finally:
        cluster.close()


# -- configuration ---------------------------------------------------------------------------------


def test_bad_configs_are_refused_at_start_with_one_clear_line(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=14)
    node = cluster.add_node("node-1", "region-a")
    good = node.config.read_text()

    ok = run_cli([*MESHNODE, "check-config", "--config", str(node.config)])
    assert ok.returncode == 0, ok.stderr
    assert "allow_file_backend" in ok.stdout

    bad = {
        "unknown key": (good.replace("[mesh]\n", "[mesh]\nlisten_everywhere = true\n"), "listen_everywhere"),
        "unknown section": (good + "\n[tls]\ncert = 'x'\n", "tls"),
        "file backend without override": (good.replace("allow_file_backend = true", "allow_file_backend = false"),
                                          "allow_file_backend"),
        "admin not on loopback": (good.replace(f'listen = "{node.ip}:{node.admin_port}"',
                                               f'listen = "0.0.0.0:{node.admin_port}"'), "admin_non_loopback"),
        "not toml": (good + "\n[[[\n", "TOML"),
        "bad gossip knob": (good + "fanout_everything = 3\n", "fanout_everything"),
    }
    for name, (text, word) in bad.items():
        assert text != good, name
        cfg = node.dir / f"bad-{name.replace(' ', '-')}.toml"
        cfg.write_text(text)
        for cmd in ("run", "check-config"):
            proc = run_cli([*MESHNODE, cmd, "--config", str(cfg)], timeout_s=30)
            _no_traceback(proc)
            assert proc.returncode != 0, (name, cmd, proc.stdout)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, (name, cmd, proc.stderr)
            assert lines[0].startswith("meshnode: error:") and word in lines[0], (name, cmd, lines)
        # Nothing was started: the admin port is not listening.
        assert node.admin("/healthz", timeout_s=0.5) is None

    # With the override named explicitly the same admin address is accepted (and listed as active).
    overridden = bad["admin not on loopback"][0].replace("admin_non_loopback = false", "admin_non_loopback = true")
    cfg = node.dir / "overridden.toml"
    cfg.write_text(overridden)
    proc = run_cli([*MESHNODE, "check-config", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr
    assert "admin_non_loopback" in proc.stdout

    # A mesh address already in use is one clear line too, not a traceback.
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((node.ip, node.mesh_port))
        s.listen()
        proc = run_cli([*MESHNODE, "run", "--config", str(node.config)], timeout_s=30)
    _no_traceback(proc)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("meshnode: error:"), proc.stderr


# -- the drop directory ----------------------------------------------------------------------------


def test_drop_directory_applies_signed_files_and_rejects_junk_with_a_reason(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=15)
    try:
        node = cluster.add_node("node-1", "region-a", sources='drop_dir = "drop"\ndrop_poll_s = 0.2')
        drop = node.dir / "drop"
        drop.mkdir()
        serial, data = cluster.sign()
        drop_file(drop, "policy-v1.msgpack", data)  # there before the daemon starts
        node.start()
        node.wait_up()
        wait_until(lambda: node.applied_serial() == serial, 20, "the dropped policy applied")
        wait_until(lambda: (drop / "accepted" / "policy-v1.msgpack").exists(), 10, "accepted/policy-v1.msgpack")
        assert not (drop / "policy-v1.msgpack").exists()
        assert (drop / "accepted" / "policy-v1.msgpack").read_bytes() == data

        other = Cluster(tmp_path / "other", subnet=23, cluster=cluster.name)
        _, foreign = other.sign()
        drop_file(drop, "junk.bin", b"this is not a signed policy\n")
        drop_file(drop, "foreign.msgpack", foreign)
        drop_file(drop, "replay.msgpack", data)  # the same version again: a duplicate is not an error
        for name in ("junk.bin", "foreign.msgpack"):
            wait_until(lambda name=name: (drop / "rejected" / f"{name}.reason").exists(), 10, f"{name} rejected")
            assert not (drop / name).exists()
            assert (drop / "rejected" / name).exists()
            reason = (drop / "rejected" / f"{name}.reason").read_text().strip()
            assert reason and "\n" not in reason
        assert "signature" in (drop / "rejected" / "foreign.msgpack.reason").read_text().lower()
        wait_until(lambda: not (drop / "replay.msgpack").exists(), 10, "replay.msgpack processed")
        assert node.applied_serial() == serial  # nothing replaced the good policy

        serial2, data2 = cluster.sign()
        drop_file(drop, "policy-v2.msgpack", data2)
        wait_until(lambda: node.applied_serial() == serial2, 20, "the second dropped policy applied")
        assert (drop / "accepted" / "policy-v2.msgpack").exists()
        assert not (drop / "rejected" / "policy-v2.msgpack").exists()
    finally:
        cluster.close()


# -- the demo --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_once_writes_a_converged_report(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = run_cli([*MESHCTL, "demo", "--nodes", "4", "--regions", "2", "--once", "--json", str(out),
                    "--dir", str(tmp_path / "demo"), "--base-port", "28400"], timeout_s=150)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["nodes"] == 4 and rep["regions"] == 2
    assert rep["all_converged"] is True
    assert rep["steps"], rep
    for step in rep["steps"]:
        assert {"name", "serial", "converged", "ms"} <= set(step), step
        assert isinstance(step["name"], str) and step["name"]
        assert isinstance(step["serial"], int) and step["serial"] >= 1
        assert step["converged"] is True
        assert isinstance(step["ms"], (int, float)) and step["ms"] >= 0
    serials = [s["serial"] for s in rep["steps"]]
    assert serials == sorted(serials) and serials[-1] > serials[0]
    # No meshnode process of the demo outlives it.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
