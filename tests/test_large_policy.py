"""A policy at the documented limit (4,096 rules) publishes through `meshctl policy publish` and gossips
to every node; one rule more is refused at sign time with one clear line. Real daemons, no mocks.

Before the transport caps agreed with the channel's chunking, any application message over one Noise
frame (~64 KiB, about 800 rules) closed the operator channel with 1009 ("closed the connection").
"""

from __future__ import annotations

import time

import pytest

from protocol.trust import MAX_ENVELOPE_BYTES, MAX_RULES, parse_policy_toml
from tests.daemon_helpers import BASE_POLICY, MESHCTL, Cluster, bulk_rules, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BASE_RULES = len(parse_policy_toml(BASE_POLICY)[0].allow)


def test_a_4096_rule_policy_publishes_and_converges_on_every_node(tmp_path) -> None:
    cluster = Cluster(tmp_path / "c", subnet=70)
    try:
        nodes = [cluster.add_node(f"node-{i + 1}", f"region-{'ab'[i % 2]}") for i in range(3)]
        cluster.start(nodes)
        cluster.wait_members(nodes)

        serial, path = cluster.sign_toml(BASE_POLICY + bulk_rules(MAX_RULES - BASE_RULES), "max-rules")
        size = path.stat().st_size
        assert 4 * 65535 < size <= MAX_ENVELOPE_BYTES  # many Noise frames, within the envelope cap

        t0 = time.monotonic()
        pub = run_cli([*MESHCTL, "policy", "publish", str(path), "--node", nodes[0].mesh,
                       "--identity", str(cluster.operator)])
        assert pub.returncode == 0, pub.stderr
        assert "Traceback" not in pub.stderr
        published = time.monotonic()
        cluster.wait_serial(serial, nodes, timeout_s=90)  # the other two get it by gossip
        converged = time.monotonic()
        print(f"\n4096-rule envelope {size} bytes; publish {published - t0:.2f} s; "
              f"converge after publish {converged - published:.2f} s")
        hashes = {n.status()["policy"]["hash"] for n in nodes}
        assert len(hashes) == 1
        for n in nodes:
            assert n.alive

        # One rule over the limit: refused when signing, with one clear line and no traceback.
        over = cluster.root / "policies" / "over.toml"
        over.write_text(BASE_POLICY + bulk_rules(MAX_RULES - BASE_RULES + 1))
        bad = run_cli([*MESHCTL, "policy", "sign", str(over), "--authority", str(cluster.authority),
                       *cluster.key_args(), "--out", str(over.with_suffix(".msgpack"))])
        assert bad.returncode != 0
        assert "Traceback" not in bad.stderr
        assert f"{MAX_RULES + 1} rules: at most {MAX_RULES} are allowed" in bad.stderr, bad.stderr
        assert not over.with_suffix(".msgpack").exists()
    finally:
        cluster.close()
