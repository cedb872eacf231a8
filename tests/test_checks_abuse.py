"""Handshake abuse detector on a virtual clock; who may be blocked; the block set's rendering."""

from __future__ import annotations

import pytest

from meshnode.checks import diff_findings
from meshnode.checks.abuse import AbuseDetector, BlockGuard, block_argv
from meshnode.enforce import RenderOptions, render, ruleset_digest, to_iptables, to_nft_json, to_nft_text
from meshnode.enforce.model import EnforcementError, Packet
from meshnode.enforce.nft_digest import normalize, normalized_hash
from simulations.identities import make_authority, make_node

EVIL, OTHER = "203.0.113.9", "198.51.100.7"


def test_one_finding_per_episode_resolved_after_quiet() -> None:
    det = AbuseDetector(threshold=5, window_s=10)
    opened = [det.record(EVIL, "rate_limited", 100 + i * 0.1) for i in range(4)]
    assert opened == [False] * 4 and det.findings(101) == {}  # under the threshold
    assert det.record(EVIL, "handshake_failed", 101)  # the fifth within the window opens the episode
    first = det.findings(101)
    assert list(first) == [EVIL] and first[EVIL].check == "handshake_abuse"
    changes = diff_findings({}, first)
    assert [f.subject for f in changes.raised] == [EVIL]

    # A flood of 10,000 more attempts: still one finding, never raised again.
    prev = first
    for i in range(10_000):
        assert not det.record(EVIL, "rate_limited", 101 + i * 0.0005)
        if i % 1000 == 0:
            now_findings = det.findings(101 + i * 0.0005)
            assert diff_findings(prev, now_findings).raised == ()
            prev = now_findings
    last = 101 + 9_999 * 0.0005
    assert det.findings(last)[EVIL].details["attempts"] == 10_005
    assert det.findings(last)[EVIL].details["reasons"] == {"handshake_failed": 1, "rate_limited": 10_000}
    assert det.next_deadline() == pytest.approx(last + 10)

    # Quiet for less than a window: still open. A full window: resolved.
    assert EVIL in det.findings(last + 9.9)
    resolved = det.findings(last + 10)
    assert resolved == {} and diff_findings(prev, resolved).resolved == (EVIL,)
    assert det.next_deadline() is None

    # A new burst later is a new episode.
    for i in range(5):
        det.record(EVIL, "rate_limited", 500 + i)
    assert det.findings(505)[EVIL].details["attempts"] == 5


def test_slow_failures_never_reach_the_threshold() -> None:
    det = AbuseDetector(threshold=3, window_s=10)
    for i in range(100):  # one every 6 s: at most two in any 10 s window
        assert not det.record(OTHER, "handshake_failed", i * 6.0)
    assert det.findings(600) == {}
    assert len(det) == 1 and det.findings(700) == {} and len(det) == 0  # idle sources are forgotten


def test_memory_is_bounded() -> None:
    det = AbuseDetector(threshold=2, window_s=60, max_sources=100)
    for i in range(10_000):
        det.record(f"10.0.{i // 256}.{i % 256}", "rate_limited", 1.0)
    assert len(det) == 100


def _ruleset(abuse_block: bool, **opts):  # type: ignore[no-untyped-def]
    auth = make_authority()
    a = make_node(auth, "node-a", roles=("db",), addresses=("10.9.0.1", "fd09::1"))
    b = make_node(auth, "node-b", roles=("app",), addresses=("10.9.0.2",))
    return render(None, a.cert, [b.cert], RenderOptions(mesh_port=7946, abuse_block=abuse_block, **opts))


def test_block_guard_protects_members_break_glass_and_loopback() -> None:
    guard = BlockGuard.from_ruleset(_ruleset(True, break_glass_cidrs=("192.0.2.0/24",)), extra_cidrs=["100.64.0.0/10"])
    assert guard.may_block(EVIL) and guard.may_block("2001:db8:dead::1")
    for protected in ("10.9.0.1", "10.9.0.2", "fd09::1", "192.0.2.77", "100.64.1.1", "127.0.0.1", "::1",
                      "::ffff:127.0.0.1", "::ffff:10.9.0.2", "not-an-address", "0.0.0.0"):
        assert not guard.may_block(protected), protected


def test_block_argv() -> None:
    assert block_argv("policymesh", EVIL, 300) == [
        "nft", "add", "element", "inet", "policymesh", "abusers_v4", "{ 203.0.113.9 timeout 300s }"]
    assert block_argv("pm", "::ffff:203.0.113.9", 5)[5:] == ["abusers_v4", "{ 203.0.113.9 timeout 5s }"]
    assert block_argv("pm", "2001:db8::1", 5)[5] == "abusers_v6"
    with pytest.raises(ValueError):
        block_argv("pm", EVIL, 0)


def test_block_sets_render_only_when_enabled() -> None:
    plain, blocking = _ruleset(False), _ruleset(True)
    assert "abusers" not in to_nft_text(plain)
    text = to_nft_text(blocking)
    assert "set abusers_v4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}" in text
    assert 'iif "lo" accept comment "loopback"\n\t\tip saddr @abusers_v4 drop comment "abuse block"' in text
    # Rendered empty: until the daemon adds a source, members reach the mesh port as before.
    assert blocking.evaluate(Packet(src="10.9.0.2", dport=7946)) == "accept"
    # Elements added at run time are not part of the ruleset (no drift); the structure is.
    doc = to_nft_json(blocking)
    assert normalized_hash(normalize(doc)) == ruleset_digest(blocking).hash
    with_element = {"nftables": [*doc["nftables"], {"add": {"element": {
        "family": "inet", "table": "policymesh", "name": "abusers_v4",
        "elem": [{"elem": {"val": EVIL, "timeout": 300}}]}}}]}
    assert normalized_hash(normalize(with_element)) == ruleset_digest(blocking).hash
    assert ruleset_digest(plain).hash != ruleset_digest(blocking).hash
    with pytest.raises(EnforcementError, match="nftables"):
        to_iptables(blocking)
    to_iptables(plain)
