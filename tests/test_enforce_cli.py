"""``render_command`` (what ``meshnode render`` prints): verification with the trust state, fail-static,
and never an allow-all ruleset for input that does not verify."""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest

from meshnode.cli.render import render_command
from meshnode.enforce import EnforcementError, RenderOptions
from protocol.errors import ExpiredError, FormatError, RevokedError, RollbackError, SignatureError, TrustError
from protocol.trust import Authority, Revocations, TrustedState
from simulations.identities import T0, NodeIdentity, make_authority, make_node
from tests.fixtures import sample_document, sign_sample

OPTS = RenderOptions(mesh_port=7946)
DAY = 86400


class World(NamedTuple):
    auth: Authority
    a: NodeIdentity
    b: NodeIdentity
    c: NodeIdentity
    old: NodeIdentity


@pytest.fixture(scope="module")
def world() -> World:
    auth = make_authority()
    a = make_node(auth, "node-a", roles=("db",), addresses=("10.3.0.1",))
    b = make_node(auth, "node-b", roles=("app",), addresses=("10.3.0.2",))
    c = make_node(auth, "node-c", roles=("web",), addresses=("10.3.0.3",))
    old = make_node(auth, "node-old", roles=("app",), addresses=("10.3.0.4",), now=T0 - 400 * DAY)
    return World(auth, a, b, c, old)


def trust_for(auth: Authority) -> TrustedState:
    return TrustedState(auth.root_bytes)


def run(world: World, policy: bytes | None, peers: list[bytes] | None = None, fmt: str = "nft", now: float = T0,
        trust: TrustedState | None = None, own: bytes | None = None) -> str:
    auth, a, b, c, _ = world
    return render_command(
        policy_bytes=policy, own_cert_bytes=own or a.cert_bytes,
        peer_cert_bytes=peers if peers is not None else [b.cert_bytes, c.cert_bytes],
        trust=trust or trust_for(auth), now=now, options=OPTS, fmt=fmt,
    )


def test_renders_the_verified_policy(world: World) -> None:
    auth = world[0]
    text = run(world, sign_sample(auth, 1))
    assert "policy serial 1" in text
    assert "table inet policymesh {}\ndelete table inet policymesh\ntable inet policymesh {" in text
    assert 'ip saddr @role_app_v4 tcp dport 5432 accept comment "allow app-to-db"' in text
    assert "elements = { 10.3.0.2 }" in text
    assert text.rstrip().endswith('drop comment "default"\n\t}\n}')


def test_json_format_is_nft_json(world: World) -> None:
    doc = json.loads(run(world, sign_sample(world[0], 1), fmt="json"))
    cmds = doc["nftables"]
    assert cmds[0] == {"metainfo": {"json_schema_version": 1}}
    assert cmds[1] == {"add": {"table": {"family": "inet", "name": "policymesh"}}}
    assert cmds[2] == {"delete": {"table": {"family": "inet", "name": "policymesh"}}}
    with pytest.raises(EnforcementError, match="format"):
        run(world, None, fmt="yaml")


def test_iptables_format_is_the_iptables_backend_input(world: World) -> None:
    text = run(world, sign_sample(world[0], 1), fmt="iptables")
    assert "# --- ipset restore" in text and "# --- iptables-restore --noflush" in text
    assert "10.3.0.2" in text  # node-b (app) may reach node-a (db) on 5432
    assert "5432" in text


def test_no_policy_renders_drop_with_interlock(world: World) -> None:
    text = run(world, None)
    assert "policy serial none" in text
    assert "ip saddr @members_v4 tcp dport 7946 accept" in text
    assert 'iif "lo" accept' in text
    assert "allow " not in text
    assert text.rstrip().endswith('drop comment "default"\n\t}\n}')


@pytest.mark.parametrize("mangle", ["garbage", "truncated", "other-authority", "unsigned"])
def test_unverifiable_policy_is_refused(world: World, mangle: str) -> None:
    auth = world[0]
    good = sign_sample(auth, 1)
    if mangle == "garbage":
        data = b"\x93not a policy"
    elif mangle == "truncated":
        data = good[: len(good) // 2]
    elif mangle == "other-authority":
        data = sign_sample(make_authority(label="evil"), 1)
    else:
        doc, rev = sample_document()
        data = auth.sign_policy(doc, 1, T0, T0 + DAY, rev, signers=0)
    with pytest.raises(TrustError):
        run(world, data)


def test_unverifiable_peer_certificate_is_refused(world: World) -> None:
    evil = make_node(make_authority(label="evil"), "node-x", roles=("app",), addresses=("10.3.0.66",))
    with pytest.raises(SignatureError, match="peer certificate #2"):
        run(world, sign_sample(world[0], 1), peers=[world[2].cert_bytes, evil.cert_bytes])
    with pytest.raises(FormatError):
        run(world, sign_sample(world[0], 1), peers=[b"junk"])


def test_own_certificate_must_verify_and_be_valid(world: World) -> None:
    auth, a, b, c, old = world
    with pytest.raises(ExpiredError, match="this node"):
        run(world, None, own=old.cert_bytes)
    evil = make_node(make_authority(label="evil"), "node-a", roles=("db",), addresses=("10.3.0.1",))
    with pytest.raises(SignatureError):
        run(world, None, own=evil.cert_bytes)
    doc, _ = sample_document()
    revoking = auth.sign_policy(doc, 2, T0, T0 + DAY, Revocations(nodes=("node-a",)))
    with pytest.raises(RevokedError):
        run(world, revoking)


def test_expired_or_revoked_peers_are_left_out_and_listed(world: World) -> None:
    auth, a, b, c, old = world
    doc, _ = sample_document()
    pol = auth.sign_policy(doc, 2, T0, T0 + DAY, Revocations(certs=(b.cert.cert_id,)))
    text = run(world, pol, peers=[b.cert_bytes, c.cert_bytes, old.cert_bytes])
    assert "10.3.0.2" not in text.split("table inet policymesh {}")[1]
    assert "10.3.0.4" not in text.split("table inet policymesh {}")[1]
    assert f"# excluded: node-b ({b.cert.cert_id}): certificate revoked" in text
    assert "# excluded: node-old" in text and "certificate expired" in text


def test_expired_policy_is_refused_as_new_input_but_kept_when_already_trusted(world: World) -> None:
    auth = world[0]
    pol = sign_sample(auth, 5, valid_s=DAY)
    later = T0 + 30 * DAY
    with pytest.raises(ExpiredError):
        run(world, pol, now=later)
    trust = trust_for(auth)
    trust.accept_policy(pol, T0)
    # fail-static: the trust state's current (now stale) policy still renders, from state or as a duplicate
    for policy_bytes in (None, pol):
        text = run(world, policy_bytes, now=later, trust=trust)
        assert "policy serial 5" in text and "allow app-to-db" in text
    with pytest.raises(RollbackError):
        run(world, sign_sample(auth, 4), trust=trust)
