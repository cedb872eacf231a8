"""A validly enrolled rogue peer (tests/rogue.py) attacks a real daemon. For each attack: the daemon
stays alive, the rogue's excess is refused or its channel closed, the victim's RSS grows by less than
32 MiB during the attack, and the honest nodes still converge on a newly published version."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest

from protocol.errors import MeshError
from protocol.gossip import wire as gossip_wire
from tests.daemon_helpers import Cluster, NodeProc, metric_sum, rss_kib
from tests.rogue import RoguePeer, slowloris

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RSS_BUDGET_KIB = 32 * 1024
FRAMES_REFUSED = "policymesh_frames_refused_total"


class Mesh:
    def __init__(self, cluster: Cluster, nodes: list[NodeProc], rogue: RoguePeer) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.rogue = rogue
        self.victim = nodes[0]

    def converge_new_version(self) -> int:
        serial, data = self.cluster.sign()
        reply = self.cluster.publish(self.nodes[1], data)
        assert reply["ok"], reply
        self.cluster.wait_serial(serial, self.nodes)
        return serial

    def after_attack(self, name: str, rss_before_kib: int, rss_peak_kib: int) -> None:
        assert self.victim.alive, self.victim.log_text()[-3000:]
        growth = max(rss_peak_kib, rss_kib(self.victim.pid)) - rss_before_kib
        print(f"\n{name}: victim RSS {rss_before_kib / 1024:.1f} MiB -> peak {rss_peak_kib / 1024:.1f} MiB "
              f"(+{growth / 1024:.1f} MiB)")
        assert growth < RSS_BUDGET_KIB, f"{name}: RSS grew by {growth / 1024:.1f} MiB"
        self.converge_new_version()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tmp_path_factory.mktemp("rogue"), subnet=73)
    try:
        nodes = [cluster.add_node(f"node-{i + 1}", f"region-{'ab'[i % 2]}") for i in range(3)]
        cluster.start(nodes)
        cluster.wait_members(nodes)
        m = Mesh(cluster, nodes, RoguePeer(cluster))
        m.converge_new_version()
        yield m
    finally:
        cluster.close()


class RssWatch:
    """Samples a process's RSS while an attack runs; `peak` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        self.peak = self.before

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_kib(self.pid))
            await asyncio.sleep(0.05)


async def _with_rss(pid: int, attack: Any) -> tuple[RssWatch, Any]:
    """Run an attack coroutine while sampling the victim's RSS; returns (watch, the attack's result)."""
    watch = RssWatch(pid)
    task = asyncio.get_running_loop().create_task(watch.run())
    try:
        result = await attack
    finally:
        task.cancel()
    watch.peak = max(watch.peak, rss_kib(pid))
    return watch, result


def test_flood_of_big_valid_format_messages(mesh: Mesh) -> None:
    ids = tuple(f"no-such-member-{i:05d}-" + "x" * 40 for i in range(gossip_wire.MAX_BATCH))
    big = gossip_wire.MemberPull(records=ids, statuses=())
    assert len(gossip_wire.encode(big)) > 200_000

    async def attack() -> int:
        sent = 0
        ch = await mesh.rogue.connect(mesh.victim)
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and sent < 400:
            if not await ch.send(gossip_wire.encode(big)):
                await ch.close()
                try:
                    ch = await mesh.rogue.connect(mesh.victim)
                except (aiohttp.ClientError, MeshError, OSError):  # refused (e.g. rate limited): done
                    return sent
                continue
            sent += 1
        await ch.close()
        return sent

    watch, sent = asyncio.run(_with_rss(mesh.victim.pid, attack()))
    print(f"\nflood: {sent} messages of {len(gossip_wire.encode(big))} bytes")
    mesh.after_attack("flood", watch.before, watch.peak)


def test_oversize_message_closes_the_channel_after_at_most_the_gossip_cap(mesh: Mesh) -> None:
    before = metric_sum(mesh.victim.metrics(), FRAMES_REFUSED)

    async def attack() -> list[bool]:
        closed = []
        for _ in range(6):  # the old 16 MiB reassembly cap let 6 channels pin ~94 MiB
            ch = await mesh.rogue.connect(mesh.victim)
            await ch.send(bytes(gossip_wire.MAX_MESSAGE_BYTES + 1))
            closed.append(await ch.wait_closed(10))
            await ch.close()
        return closed

    watch, closed = asyncio.run(_with_rss(mesh.victim.pid, attack()))
    assert all(closed), closed
    after = mesh.victim.metrics()
    assert metric_sum(after, FRAMES_REFUSED, reason="peer_message_too_large") >= 6
    assert metric_sum(after, FRAMES_REFUSED) > before
    mesh.after_attack("oversize", watch.before, watch.peak)


def test_many_channels_under_one_identity_keep_at_most_two(mesh: Mesh) -> None:
    async def attack() -> list[bool]:
        chans = [await mesh.rogue.connect(mesh.victim) for _ in range(8)]
        await asyncio.sleep(1.0)
        for ch in chans:  # a send keeps each channel busy; the closed ones report it
            await ch.send(gossip_wire.encode(gossip_wire.Nack(seq=1)))
        await asyncio.sleep(1.0)
        open_now = [not (ch.ended or ch.ws.closed) for ch in chans]
        for ch in chans:
            await ch.close()
        return open_now

    watch = RssWatch(mesh.victim.pid)
    open_now = asyncio.run(attack())
    assert sum(open_now) <= 2, open_now
    assert open_now[-1], "the newest channel is the one kept"
    assert metric_sum(mesh.victim.metrics(), FRAMES_REFUSED, reason="too_many_channels") >= 6
    mesh.after_attack("channels", watch.before, max(watch.before, rss_kib(mesh.victim.pid)))


def test_slowloris_from_many_sources(mesh: Mesh) -> None:
    watch = RssWatch(mesh.victim.pid)
    sources = [f"127.66.73.{100 + i}" for i in range(40)]
    socks = slowloris(mesh.victim, sources, per_source=20)  # 800 attempts; at most 16 per source held
    try:
        time.sleep(0.5)
        held = [s for s in socks if not _closed_by_peer(s)]
        print(f"\nslowloris: {len(socks)} connections opened, {len(held)} held by the node")
        assert len(held) <= 256  # mesh.preauth_max (default); the rest were aborted at accept
        mesh.converge_new_version()  # while the sockets hang
        peak = rss_kib(mesh.victim.pid)
    finally:
        for s in socks:
            s.close()
    m = mesh.victim.metrics()
    assert metric_sum(m, "policymesh_handshakes_total", result="refused", reason="preauth_limit") >= 1
    mesh.after_attack("slowloris", watch.before, peak)


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_replay_of_an_old_signed_policy(mesh: Mesh) -> None:
    old_serial, old = mesh.cluster.sign()
    assert mesh.cluster.publish(mesh.nodes[1], old)["ok"]
    mesh.cluster.wait_serial(old_serial, mesh.nodes)
    mesh.converge_new_version()  # `old` is now superseded
    events_before = len(mesh.victim.log_events())

    async def attack() -> tuple[int, bool]:
        sent = 0
        ch = await mesh.rogue.connect(mesh.victim)
        for _ in range(2000):
            if not await ch.send(gossip_wire.encode(gossip_wire.PolicyPush(old))):
                break
            sent += 1
        closed = await ch.wait_closed(10)
        await ch.close()
        return sent, closed

    watch, (sent, closed) = asyncio.run(_with_rss(mesh.victim.pid, attack()))
    time.sleep(1.0)
    events = [str(e.get("event", "")) for e in mesh.victim.log_events()][events_before:]
    alerts = sum(1 for e in events if e.startswith("alert."))
    stale = sum(1 for e in events if e == "alert.policy.stale_offer")
    print(f"\nreplay: {alerts} alert lines ({stale} stale_offer) for {sent} replays; channel closed: {closed}")
    # one alert per (peer, kind) episode, and repeated replays cost the rogue its channel
    assert stale == 1, events
    assert closed, "the victim kept the replaying channel open"
    mesh.after_attack("replay", watch.before, watch.peak)
