"""A validly enrolled rogue peer against a real `meshnode`: member-table memory and incarnations.

The rogue speaks the gossip protocol over a real Noise channel (its own certificate and keys) and
sends what used to pin memory or break the node: tens of MB of unsigned status items about
non-members (+242 MiB RSS before the fix), 10,000 self-signed records each superseding the last
(+26 MiB), and a suspicion of the node at incarnation 2^64-1 (the node could no longer refute and
exited 1 on SIGTERM).  Uses subnet 150 (see tests/daemon_helpers.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from meshnode.identity import load_identity_dir
from protocol.gossip.wire import (
    MAX_INCARNATION,
    Alive,
    MemberRecord,
    Members,
    Ping,
    Status,
    StatusBody,
    Suspect,
    encode,
)
from protocol.trust import encode_envelope, sign
from tests.daemon_helpers import Cluster, meshctl, send_as, wait_until

RSS_BUDGET_MIB = 32  # issue 10: a rogue enrolled peer cannot raise a daemon's RSS by more than this


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024



@pytest.mark.slow
def test_rogue_member_cannot_pin_memory_or_break_refutation(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=150)
    try:
        a = cluster.add_node("node-a", "region-a")
        b = cluster.add_node("node-b", "region-a")
        rogue_dir = tmp_path / "rogue-1"
        meshctl("node", "enroll", "--authority", cluster.authority, "--node-id", "rogue-1", "--region", "region-a",
                "--role", "app", "--address", "127.66.150.9", "--out", rogue_dir, "--backend", "file", "--valid", "1d",
                *cluster.key_args("enroll"))
        rogue = load_identity_dir(rogue_dir)
        cluster.start()
        cluster.wait_members()
        base = rss_mib(a.pid)

        # ~29 MB of unsigned status items about non-members (messages under the channel's chunk size)
        ghosts = [encode(Members((), tuple(
            Status(encode(StatusBody(f"ghost-{k}-{j}", 1, 1, b"\0" * 8, b"", "x" * 120)), b"\1" * 64)
            for j in range(250)))) for k in range(550)]
        asyncio.run(send_as(a.mesh, rogue_dir, ghosts))
        del ghosts
        # 10,000 self-signed records of the rogue, each superseding the last
        inc0 = int(time.time() * 1000)
        records = [encode_envelope(sign("member", encode(MemberRecord(
            "rogue-1", inc0 + k, "127.66.150.9:7946", rogue.cert_bytes)), [rogue.identity_seed]))
            for k in range(10_000)]
        asyncio.run(send_as(a.mesh, rogue_dir, [
            encode(Ping(k, a.node_id, tuple(Alive(r) for r in records[k:k + 32]))) for k in range(0, len(records), 32)]))
        del records
        wait_until(lambda: any(m["node_id"] == "rogue-1" and m["incarnation"] == inc0 + 9_999
                               for m in (a.status() or {}).get("cluster_view", {}).get("members", [])),
                   20, "the rogue's last record installed", interval_s=0.2)
        grown = rss_mib(a.pid) - base
        assert grown < RSS_BUDGET_MIB, f"RSS grew by {grown:.1f} MiB"

        # A suspicion at the largest incarnation: refused, and the node still refutes, leaves and exits 0.
        asyncio.run(send_as(a.mesh, rogue_dir, [encode(Ping(1, a.node_id, (Suspect(a.node_id, MAX_INCARNATION, "rogue-1"),)))]))
        assert a.alive
        assert "node-a" in b.alive_members()
        assert a.stop(signal.SIGTERM) == 0
        assert "Traceback" not in a.log_text()
    finally:
        cluster.close()
