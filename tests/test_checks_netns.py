"""Local checks against real kernels in network namespaces: the abuse block set with real nftables, the
port audit of a namespace's own listeners, the port-scan record sets filled by real dropped connections."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from meshnode.checks.abuse import BlockGuard, block_argv
from meshnode.checks.local import LocalChecks
from meshnode.checks.port_scan import list_argv, merge_listings, record_sets
from meshnode.checks.ports import Listener, audit_ports
from meshnode.config import ValidateSection
from meshnode.enforce import RenderOptions, make_backend, render, to_nft_text
from protocol.trust import TrustedState, parse_policy_toml
from simulations.identities import T0, make_authority, make_node
from tests.netns import Lab, lab_or_skip

pytestmark = pytest.mark.root
MESH, DB, UNDECLARED = 7946, 5432, 8080
POLICY_PORTS = [MESH, DB, UNDECLARED]

READ_LISTENERS = r"""
import json
from meshnode.checks.ports import read_listeners
print(json.dumps([[x.proto, x.address, x.port, x.inode, x.process] for x in read_listeners()]))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = lab_or_skip("nft")
    try:
        lab.start_listener("a", POLICY_PORTS)
        yield lab
    finally:
        lab.down()


def _ruleset(lab: Lab, break_glass: tuple[str, ...] = (), port_scan_window_s: int = 0):  # type: ignore[no-untyped-def]
    auth = make_authority()
    nodes = {h: make_node(auth, f"node-{h}", roles=(("db",) if h == "a" else ("app",)),
                          addresses=(lab.addr4[h], lab.addr6[h])) for h in ("a", "b")}
    doc, rev = parse_policy_toml("""
[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432", "tcp/8080"]
""")
    signed = auth.sign_policy(doc, 1, T0, T0 + 86400, rev)
    pv = TrustedState(auth.root_bytes).accept_policy(signed, T0).policy
    opts = RenderOptions(mesh_port=MESH, abuse_block=True, mesh_join_cidrs=("0.0.0.0/0", "::/0"),
                         break_glass_cidrs=break_glass, port_scan_window_s=port_scan_window_s)
    return render(pv, nodes["a"].cert, [nodes["b"].cert], opts, now=T0)


def test_abuser_is_blocked_for_a_while_without_drift(lab: Lab) -> None:
    lab.reset_firewall("a")
    ruleset = _ruleset(lab)
    backend = make_backend("nftables", RenderOptions(mesh_port=MESH), netns=lab.ns["a"])
    backend.apply(ruleset)
    a4, c4, b4 = lab.addr4["a"], lab.addr4["c"], lab.addr4["b"]
    # c is not a member: it may only open the mesh port (the join rule); b is a member with role app.
    assert lab.probe("c", [(a4, MESH), (a4, DB)]) == ["open", "timeout"]
    assert lab.probe("b", [(a4, MESH), (a4, DB)]) == ["open", "open"]

    guard = BlockGuard.from_ruleset(ruleset)
    assert guard.may_block(c4) and not guard.may_block(b4) and not guard.may_block("127.0.0.1")
    lab.exec("a", block_argv(ruleset.table, c4, 3))
    lab.exec("a", block_argv(ruleset.table, lab.addr6["c"], 3))
    assert lab.probe("c", [(a4, MESH), (lab.addr6["a"], MESH)]) == ["timeout", "timeout"]
    assert lab.probe("b", [(a4, MESH)]) == ["open"]  # the others are untouched

    # A dynamic element is not drift: the drift check leaves it (and the block) in place.
    drift = backend.check_drift()
    assert drift.checked and not drift.drifted
    listing = lab.exec("a", ["nft", "list", "set", "inet", ruleset.table, "abusers_v4"]).stdout.decode()
    assert c4 in listing and "expires" in listing

    # The timeout ends the block (generous deadline; the kernel expires the element).
    deadline = time.monotonic() + 15
    while lab.probe("c", [(a4, MESH)]) != ["open"]:
        assert time.monotonic() < deadline, "the block did not expire"
        time.sleep(0.5)


def test_port_audit_of_a_namespace(lab: Lab) -> None:
    out = lab.exec("a", [sys.executable, "-c", READ_LISTENERS]).stdout
    listeners = [Listener(*row) for row in json.loads(out)]
    assert {x.subject for x in listeners} == {f"tcp/{p}" for p in POLICY_PORTS}
    assert all(x.address == "::" and x.process.startswith("python") for x in listeners)
    findings = audit_ports(listeners, _ruleset(lab), [f"tcp/{DB}", f"tcp/{MESH}", "udp/53"])
    assert {s: f.kind for s, f in findings.items()} == {
        f"tcp/{UNDECLARED}": "undeclared_listener", "udp/53": "missing_listener"}
    # The dual-stack socket is exposed by the IPv4 and the IPv6 rule of the policy.
    assert findings[f"tcp/{UNDECLARED}"].details["rules"] == [
        "allow app-to-db from role_app_v4", "allow app-to-db from role_app_v6"]


def test_port_scan_seen_in_the_kernel_sets_once(lab: Lab) -> None:
    lab.reset_firewall("a")
    ruleset = _ruleset(lab, port_scan_window_s=60)
    backend = make_backend("nftables", RenderOptions(mesh_port=MESH), netns=lab.ns["a"])
    backend.apply(ruleset)  # the JSON form
    drift = backend.check_drift()
    assert drift.checked and not drift.drifted
    a4, a6, c4, b4 = lab.addr4["a"], lab.addr6["a"], lab.addr4["c"], lab.addr4["b"]

    # c (not a member) tries 16 closed ports over IPv4 and 3 over IPv6; b (a member) 3 closed ports.
    closed = list(range(20001, 20017))
    assert lab.probe("c", [(a4, p) for p in closed] + [(a6, p) for p in closed[:3]], timeout=0.5) == ["timeout"] * 19
    assert lab.probe("b", [(a4, p) for p in closed[:3]] + [(a4, DB)], timeout=0.5) == ["timeout"] * 3 + ["open"]
    # a UDP datagram to a dropped port counts too
    lab.exec("c", [sys.executable, "-c", f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                         f".sendto(b'x', ({a4!r}, 20099))"])

    def listings() -> list[object]:
        return [json.loads(lab.exec("a", list_argv(ruleset.table, name)).stdout) for name in record_sets(ruleset)]

    checks = LocalChecks(ValidateSection(port_scan_ports=10, block_abusers_s=30), table=ruleset.table, mesh_port=MESH)
    changes, blocks = checks.port_scan_round(listings(), ruleset, 0.0)
    assert [f.subject for f in changes.raised] == [c4] and changes.resolved == ()  # once, named; not b, not c's v6
    f = changes.raised[0]
    assert f.check == "port_scan" and f.details["ports"] == 17 and 20099 in f.details["sample_ports"]
    assert checks.unreadable_elements == 0
    assert b4 in merge_listings(listings())[0]  # recorded, but a member's few ports are no scan
    assert not backend.check_drift().drifted  # the recorded elements are not drift

    # With blocking on, the scanner is dropped outright (the block set is ahead of every accept).
    assert blocks and blocks[0][0] == c4
    assert lab.probe("c", [(a4, MESH)]) == ["open"]
    lab.exec("a", blocks[0][1])
    assert lab.probe("c", [(a4, MESH)]) == ["timeout"]
    assert lab.probe("b", [(a4, MESH)]) == ["open"]
    # Still in the sets: the same episode, no second alert, no second block.
    changes, blocks = checks.port_scan_round(listings(), ruleset, 10.0)
    assert changes.raised == () and changes.resolved == () and blocks == []

    # The text form loads to the same kernel ruleset as the JSON form (no drift). Replacing the table
    # empties the dynamic sets; the episode stays open until the source has been quiet for a window.
    lab.exec("a", ["nft", "-f", "-"], stdin=to_nft_text(ruleset).encode())
    drift = backend.check_drift()
    assert drift.checked and not drift.drifted
    assert merge_listings(listings())[0] == {}
    changes, _ = checks.port_scan_round(listings(), ruleset, 20.0)
    assert changes.raised == () and changes.resolved == ()
    changes, _ = checks.port_scan_round(listings(), ruleset, 80.0)
    assert changes.resolved == (c4,)
