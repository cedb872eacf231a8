"""Fast-forward recovery on real daemons: a leaked policy key pushes serial 2^62 to every node; the
authority rotates the policy key (root v2), publishes serial 1 with the new root chain through one node,
and every node fetches root v2 over the mesh and converges on the lower serial."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.client import publish
from tests.daemon_helpers import Cluster, meshctl, run_cli, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LEAKED_SERIAL = 2**62


def test_leaked_policy_key_fast_forward_is_recovered_by_rotation(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, subnet=40)
    try:
        nodes = [cluster.add_node(f"rot-{i + 1}", f"region-{'ab'[i % 2]}") for i in range(3)]
        cluster.start(nodes)
        cluster.wait_members(nodes)
        # The attacker holds the policy key and signs an absurd serial; every node accepts it.
        toml = tmp_path / "evil.toml"
        toml.write_text('[defaults]\ninbound = "drop"\n')
        meshctl("policy", "sign", toml, "--authority", cluster.authority, *cluster.key_args(), "--serial", str(LEAKED_SERIAL),
                "--out", tmp_path / "evil.msgpack")
        assert cluster.publish(nodes[0], (tmp_path / "evil.msgpack").read_bytes())["ok"]
        cluster.wait_serial(LEAKED_SERIAL, nodes)
        # A normal serial is now refused as a rollback.
        meshctl("policy", "sign", toml, "--authority", cluster.authority, *cluster.key_args(),
                "--serial", str(LEAKED_SERIAL + 1),
                "--out", tmp_path / "probe.msgpack")
        # Recovery: rotate the policy key (root v2), sign serial 1 with the new key.
        proc = run_cli([*cluster_meshctl(), "authority", "rotate-root", str(cluster.authority), "--rotate", "policy",
                        *cluster.key_args("root")])
        assert proc.returncode == 0, proc.stderr
        assert "serials start again at 1" in proc.stdout
        serial, data = cluster.sign()
        assert serial == 1
        old_root_reply = cluster.publish(nodes[1], data)
        assert not old_root_reply["ok"]  # the node needs root v2 first, and says so
        reply = publish(nodes[1].mesh, cluster.operator, data, [(cluster.authority / "root.msgpack").read_bytes()])
        assert reply["ok"], reply
        # Every node, not only the one we talked to, fetches root v2 over the mesh and applies serial 1.
        try:
            wait_until(lambda: all(n.status()["policy"]["serial"] == 1 for n in nodes), 40, "serial 1 everywhere",
                       interval_s=0.1)
        except AssertionError:
            got = {n.node_id: (n.status()["root_version"], n.status()["policy"]["serial"]) for n in nodes}
            raise AssertionError(f"(root version, serial) per node: {got}") from None
        assert all(n.status()["root_version"] == 2 for n in nodes)
        # Enforcement follows the accepted policy asynchronously (a render and an apply later).
        wait_until(lambda: all(n.applied_serial() == 1 for n in nodes), 20, "serial 1 enforced everywhere",
                   interval_s=0.1)
        # The leaked key's signatures no longer count: another fast-forward attempt is refused.
        evil2 = (tmp_path / "probe.msgpack").read_bytes()
        assert not cluster.publish(nodes[2], evil2)["ok"]
    finally:
        cluster.close()


def cluster_meshctl() -> list[str]:
    from tests.daemon_helpers import MESHCTL

    return list(MESHCTL)
