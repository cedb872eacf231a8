"""Local checks against real kernels in network namespaces: the abuse block set with real nftables, the
port audit of a namespace's own listeners."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from meshnode.checks.abuse import BlockGuard, block_argv
from meshnode.checks.ports import Listener, audit_ports
from meshnode.enforce import RenderOptions, make_backend, render
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


def _ruleset(lab: Lab, break_glass: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
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
                         break_glass_cidrs=break_glass)
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
