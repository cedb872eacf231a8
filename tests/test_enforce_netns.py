"""Real enforcement with real TCP connections: three hosts in network namespaces on one bridge.

Host ``a`` (role db) runs a listener on every port of interest and enforces the ruleset rendered for
it; ``b`` (role app) and ``c`` (role web) connect.  A dropped connection times out, a rejected one is
refused, an allowed one opens; the namespaces are reused across tests and removed even on failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshnode.cli.render import render_command
from meshnode.enforce import Backend, NftBackend, RenderOptions, make_backend, render
from meshnode.enforce.iptables import chain_name
from protocol.trust import Authority, TrustedState, parse_policy_toml
from simulations.identities import T0, NodeIdentity, make_authority, make_node
from tests.netns import Lab, lab_or_skip

pytestmark = pytest.mark.root
MESH, DB, HTTP, RANGE, OTHER = 7946, 5432, 8080, 9005, 2222
PORTS = [MESH, DB, HTTP, RANGE, OTHER]
OPTS = RenderOptions(mesh_port=MESH)
DAY = 86400

V1 = """
[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]

[[allow]]
name = "web-to-db-http"
from = ["role:web"]
to = ["role:db"]
ports = ["tcp/8080"]
"""
V2 = """
[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]

[[allow]]
name = "web-to-db-range"
from = ["role:web"]
to = ["role:db"]
ports = ["tcp/9000-9010"]
"""
V3 = V2 + """
[revoke]
nodes = ["node-b"]
"""


@dataclass
class Mesh:
    lab: Lab
    auth: Authority
    nodes: dict[str, NodeIdentity]

    def policy_bytes(self, toml: str, serial: int) -> bytes:
        doc, rev = parse_policy_toml(toml)
        return self.auth.sign_policy(doc, serial, T0, T0 + 7 * DAY, rev)

    def expect(self, src: str, expected: dict[int, str], v6: bool = False) -> None:
        """Connect from ``src`` to host a on each port; compare with ``expected``."""
        dst = self.lab.addr6["a"] if v6 else self.lab.addr4["a"]
        got = dict(zip(expected, self.lab.probe(src, [(dst, p) for p in expected]), strict=True))
        assert got == expected, f"{src} -> a ({'v6' if v6 else 'v4'})"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    lab = lab_or_skip("nft", "iptables-restore", "ipset")
    try:
        lab.start_listener("a", PORTS)
        auth = make_authority()
        roles = {"a": ("db",), "b": ("app",), "c": ("web",)}
        nodes = {h: make_node(auth, f"node-{h}", roles=roles[h], addresses=(lab.addr4[h], lab.addr6[h]))
                 for h in lab.hosts}
        yield Mesh(lab, auth, nodes)
    finally:
        lab.down()


@pytest.fixture
def clean(mesh: Mesh) -> Mesh:
    mesh.lab.reset_firewall("a")
    return mesh


def apply_version(mesh: Mesh, backend: Backend, toml: str, serial: int) -> str:
    trust = TrustedState(mesh.auth.root_bytes)
    pv = trust.accept_policy(mesh.policy_bytes(toml, serial), T0).policy
    own = mesh.nodes["a"].cert
    members = [mesh.nodes[h].cert for h in ("b", "c")]
    return backend.apply(render(pv, own, members, OPTS, now=T0)).mode


def test_no_firewall_everything_open(clean: Mesh) -> None:
    """The lab itself works: without a ruleset every port answers."""
    clean.expect("b", {p: "open" for p in PORTS})


@pytest.mark.parametrize("backend_name", ["nftables", "iptables"])
def test_versions_are_enforced_with_real_connections(clean: Mesh, backend_name: str) -> None:
    mesh = clean
    backend = make_backend(backend_name, OPTS, netns=mesh.lab.ns["a"])

    assert apply_version(mesh, backend, V1, 1) == "full"
    mesh.expect("b", {MESH: "open", DB: "open", HTTP: "timeout", RANGE: "timeout", OTHER: "timeout"})
    mesh.expect("c", {MESH: "open", DB: "timeout", HTTP: "open", RANGE: "timeout", OTHER: "timeout"})
    mesh.expect("b", {DB: "open", HTTP: "timeout"}, v6=True)
    mesh.expect("c", {DB: "timeout", HTTP: "open"}, v6=True)

    # rules changed: nftables edits only those rules (it knows their handles from the read-back of v1;
    # here at any size), iptables replaces its whole chain
    if isinstance(backend, NftBackend):
        backend.edit_min_rules = 0
    assert apply_version(mesh, backend, V2, 2) == ("rules" if backend_name == "nftables" else "full")
    mesh.expect("c", {MESH: "open", DB: "timeout", HTTP: "timeout", RANGE: "open", OTHER: "timeout"})
    mesh.expect("b", {DB: "open", RANGE: "timeout"})

    assert apply_version(mesh, backend, V3, 3) == "sets"  # only membership changed: sets updated in place
    mesh.expect("b", {MESH: "timeout", DB: "timeout", RANGE: "timeout"})  # revoked: out of every set
    mesh.expect("b", {MESH: "timeout", DB: "timeout"}, v6=True)
    mesh.expect("c", {MESH: "open", RANGE: "open", DB: "timeout"})
    assert backend.check_drift().drifted is False


def test_done_when_enroll_sign_render_and_load_with_nft(clean: Mesh, tmp_path: Path) -> None:
    """As a new user would: three enrolled nodes, a signed policy, `meshnode render` output for node a
    loaded with `nft -f` in a's namespace, then the next version loaded over it."""
    mesh = clean
    trust = TrustedState(mesh.auth.root_bytes)
    peers = [mesh.nodes["b"].cert_bytes, mesh.nodes["c"].cert_bytes]
    ns_a = mesh.lab.ns["a"]
    mesh.lab.exec("a", ["nft", "add table inet keepme; add chain inet keepme c { type filter hook input priority 5; }"])
    for serial, toml in ((1, V1), (2, V2)):
        text = render_command(policy_bytes=mesh.policy_bytes(toml, serial), own_cert_bytes=mesh.nodes["a"].cert_bytes,
                              peer_cert_bytes=peers, trust=trust, now=T0, options=OPTS, fmt="nft")
        path = tmp_path / f"v{serial}.nft"
        path.write_text(text)
        mesh.lab.exec("a", ["nft", "-f", str(path)])
        if serial == 1:
            mesh.expect("b", {MESH: "open", DB: "open", HTTP: "timeout", OTHER: "timeout"})
            mesh.expect("c", {MESH: "open", DB: "timeout", HTTP: "open", RANGE: "timeout"})
        else:
            mesh.expect("b", {MESH: "open", DB: "open", HTTP: "timeout", RANGE: "timeout"})
            mesh.expect("c", {MESH: "open", DB: "timeout", HTTP: "timeout", RANGE: "open"})
    tables = mesh.lab.exec("a", ["nft", "list", "tables"]).stdout.decode().split("\n")
    assert sorted(t for t in tables if t) == ["table inet keepme", "table inet policymesh"], ns_a
    # the JSON form of the same version gives the same kernel state
    text = render_command(policy_bytes=mesh.policy_bytes(V2, 2), own_cert_bytes=mesh.nodes["a"].cert_bytes, peer_cert_bytes=peers,
                          trust=trust, now=T0, options=OPTS, fmt="json")
    (tmp_path / "v2.json").write_text(text)
    before = mesh.lab.exec("a", ["nft", "list", "table", "inet", "policymesh"]).stdout
    mesh.lab.exec("a", ["nft", "-j", "-f", str(tmp_path / "v2.json")])
    assert mesh.lab.exec("a", ["nft", "list", "table", "inet", "policymesh"]).stdout == before


def test_reject_log_mode_and_break_glass(clean: Mesh) -> None:
    mesh = clean
    nodes = mesh.nodes
    backend = make_backend("nftables", OPTS, netns=mesh.lab.ns["a"])
    doc, rev = parse_policy_toml('[defaults]\ninbound = "reject"\n' + V1.replace(
        'ports = ["tcp/8080"]', 'ports = ["tcp/8080"]\nmode = "log"'))
    pv = TrustedState(mesh.auth.root_bytes).accept_policy(mesh.auth.sign_policy(doc, 1, T0, T0 + DAY, rev), T0).policy
    members = [nodes["b"].cert, nodes["c"].cert]
    backend.apply(render(pv, nodes["a"].cert, members, OPTS))
    # reject answers at once; the log-mode rule lets b (not web) through on 8080 while logging it
    mesh.expect("b", {DB: "open", HTTP: "open", OTHER: "refused", RANGE: "refused"})
    mesh.expect("c", {DB: "refused", HTTP: "open"})
    # break-glass (node config override) opens every port for c's address only
    glass = RenderOptions(mesh_port=MESH, break_glass_cidrs=(f"{mesh.lab.addr4['c']}/32",))
    backend.apply(render(pv, nodes["a"].cert, members, glass))
    mesh.expect("c", {DB: "open", OTHER: "open", RANGE: "open"})
    mesh.expect("b", {OTHER: "refused"})


@pytest.mark.parametrize("backend_name", ["nftables", "iptables"])
def test_drift_is_repaired_and_enforcement_restored(clean: Mesh, backend_name: str) -> None:
    mesh = clean
    backend = make_backend(backend_name, OPTS, netns=mesh.lab.ns["a"])
    apply_version(mesh, backend, V1, 1)
    if backend_name == "nftables":  # someone opens a port in our table
        mesh.lab.exec("a", ["nft", "insert rule inet policymesh input tcp dport 2222 accept"])
    else:  # someone empties our chain: everything falls through to INPUT's ACCEPT policy
        mesh.lab.exec("a", ["iptables", "-F", chain_name("policymesh")])
    mesh.expect("b", {OTHER: "open", DB: "open"})
    d = backend.check_drift()
    assert d.drifted and d.repaired and d.drift_count == 1
    assert [e.name for e in d.events] == ["enforce.drift_detected", "enforce.drift_repaired"]
    mesh.expect("b", {OTHER: "timeout", DB: "open", MESH: "open"})
