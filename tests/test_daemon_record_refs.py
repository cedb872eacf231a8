"""Member records without their certificate (``AliveRef``) between real ``meshnode`` processes.

Three daemons and a validly enrolled rogue peer speaking over a real Noise channel: a graceful leave
reaches the other daemons as a reference they rebuild and verify; a reference to a member a daemon
holds is learned, one to a member it does not hold is refused and counted (also when an honest daemon
relays it to a peer that never heard of that member), and a forged one costs the rogue its channel,
never the daemon.  Anti-entropy is slowed to once a day so that it does not race the gossip under test:
a node's first sync falls at a random time within one interval, and a sync between a and b after the
rogue joined would hand b the rogue's whole record before a relays the reference (with a one-minute
interval the window is a few per cent of runs, and a CI run hit it).
Uses subnet 177 (see tests/daemon_helpers.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshnode.identity import load_identity_dir
from protocol.gossip.wire import (
    READS_RECORD_REFS,
    Alive,
    AliveRef,
    MemberRecord,
    Ping,
    cert_ref,
    encode,
    encode_record,
)
from protocol.trust import encode_envelope, sign
from tests.daemon_helpers import Cluster, meshctl, metric_sum, send_as, wait_until

SUBNET = 177
DAY_MS = 86_400_000



def signed(ident: Any, incarnation: int, address: str) -> tuple[bytes, AliveRef]:
    """A member's signed record, whole and as a reference."""
    rec = MemberRecord(ident.node_id, incarnation, address, ident.cert_bytes, False, READS_RECORD_REFS)
    env = sign("member", encode_record(rec), [ident.identity_seed])
    ref = AliveRef(rec.node_id, incarnation, address, False, READS_RECORD_REFS, cert_ref(ident.cert_bytes),
                   env.signatures[0].sig)
    return encode_envelope(env), ref


def counters(node: Any) -> dict[str, int]:
    st = node.status()
    return st["cluster_view"]["counters"] if st is not None else {}


def member(node: Any, node_id: str) -> dict[str, Any] | None:
    st = node.status()
    members = st["cluster_view"]["members"] if st is not None else []
    return next((m for m in members if m["node_id"] == node_id), None)


def enroll(cluster: Cluster, tmp_path: Path, node_id: str, host: int) -> Any:
    out = tmp_path / node_id
    meshctl("node", "enroll", "--authority", cluster.authority, "--node-id", node_id, "--region", "region-a",
            "--role", "app", "--address", f"127.66.{SUBNET}.{host}", "--out", out, "--backend", "file", "--valid", "1d",
            *cluster.key_args("enroll"))
    return out


@pytest.mark.slow
def test_records_without_certificate_between_real_daemons(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=SUBNET,
                      gossip={"sync_interval_ms": DAY_MS, "cross_region_sync_interval_ms": DAY_MS})
    try:
        a = cluster.add_node("node-a", "region-a")
        b = cluster.add_node("node-b", "region-a")
        c = cluster.add_node("node-c", "region-a")
        rogue_dir = enroll(cluster, tmp_path, "rogue-1", 9)
        rogue = load_identity_dir(rogue_dir)
        ghost = load_identity_dir(enroll(cluster, tmp_path, "ghost-1", 10))
        cluster.start()
        cluster.wait_members()

        # A graceful leave travels as a reference (every daemon's record lists READS_RECORD_REFS).
        before = counters(b).get("record_refs_learned", 0)
        assert c.stop(signal.SIGTERM) == 0
        wait_until(lambda: (member(b, "node-c") or {}).get("liveness") == "left", 20, "node-c left in b's view")
        wait_until(lambda: counters(b).get("record_refs_learned", 0) > before, 20, "b learned a reference")
        assert (member(a, "node-c") or {}).get("liveness") == "left"

        # The rogue joins a (whole record), then updates its record as a reference: learned.  A
        # reference to a member a never heard of: refused and counted, not blamed.
        inc0 = int(time.time() * 1000)
        first, _ = signed(rogue, inc0, f"127.66.{SUBNET}.9:7946")
        _, update = signed(rogue, inc0 + 1, f"127.66.{SUBNET}.19:7946")
        _, stranger = signed(ghost, inc0, f"127.66.{SUBNET}.10:7946")
        asyncio.run(send_as(a.mesh, rogue_dir, [encode(Ping(1, a.node_id, (Alive(first),))),
                                                encode(Ping(2, a.node_id, (update,))),
                                                encode(Ping(3, a.node_id, (stranger,)))]))
        wait_until(lambda: (member(a, "rogue-1") or {}).get("incarnation") == inc0 + 1, 20, "the update installed")
        assert (member(a, "rogue-1") or {}).get("address") == f"127.66.{SUBNET}.19:7946"
        assert counters(a).get("record_refs_unknown_member", 0) >= 1
        assert member(a, "ghost-1") is None
        # a relays the rogue's update without its certificate; b never heard of rogue-1 (joins are not
        # relayed, anti-entropy is a day away): refused and counted
        wait_until(lambda: counters(b).get("record_refs_unknown_member", 0) >= 1, 20, "b refused the relayed reference")
        assert member(b, "rogue-1") is None

        # A forged reference (another address under the update's signature): the rogue is blamed.
        forged = msgspec.structs.replace(update, incarnation=inc0 + 2, address=f"127.66.{SUBNET}.66:1")
        blamed = metric_sum(a.metrics(), "policymesh_alerts_total", event="gossip.remote_error")
        asyncio.run(send_as(a.mesh, rogue_dir, [encode(Ping(4, a.node_id, (forged,)))]))
        wait_until(lambda: metric_sum(a.metrics(), "policymesh_alerts_total", event="gossip.remote_error") > blamed,
                   20, "the rogue blamed")
        assert (member(a, "rogue-1") or {}).get("incarnation") == inc0 + 1
        assert a.alive and b.alive
        assert a.stop(signal.SIGTERM) == 0 and b.stop(signal.SIGTERM) == 0
        for n in (a, b, c):
            assert "Traceback" not in n.log_text()
    finally:
        cluster.close()
