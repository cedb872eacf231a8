"""The mesh port and new members: known members always reach it; `mesh_join_cidrs` lets nodes that no
member has seen yet (a fresh enrollment) open a channel, which the Noise handshake then authenticates."""

from __future__ import annotations

import pytest

from meshnode.enforce import EnforcementError, Packet, RenderOptions, render, to_nft_text
from protocol.trust import decode_envelope, decode_policy
from simulations.identities import make_authority, make_node
from tests.fixtures import sample_document, sign_sample

MESH = 7946
AUTH = make_authority()
OWN = make_node(AUTH, "own", roles=("db",), addresses=("10.0.0.1",)).cert
PEER = make_node(AUTH, "peer", roles=("app",), addresses=("10.0.0.2", "fd00::2")).cert
POLICY = decode_policy(decode_envelope(sign_sample(AUTH, 1), "policy").payload)


def verdict(opts: RenderOptions, src: str, dport: int = MESH) -> str:
    return render(POLICY, OWN, [PEER], opts).evaluate(Packet(src=src, proto="tcp", dport=dport))


def test_members_only_by_default_in_the_renderer():
    opts = RenderOptions(mesh_port=MESH)
    assert verdict(opts, "10.0.0.2") == "accept"
    assert verdict(opts, "fd00::2") == "accept"
    assert verdict(opts, "10.9.9.9") == "drop"  # a fresh node nobody has seen yet


def test_open_join_accepts_any_source_on_the_mesh_port_only():
    opts = RenderOptions(mesh_port=MESH, mesh_join_cidrs=("0.0.0.0/0", "::/0"))
    assert verdict(opts, "10.9.9.9") == "accept"
    assert verdict(opts, "2001:db8::9") == "accept"
    assert verdict(opts, "10.9.9.9", dport=22) == "drop"  # nothing else opens
    assert "tcp dport 7946 accept" in to_nft_text(render(POLICY, OWN, [PEER], opts))


def test_narrow_join_cidrs():
    opts = RenderOptions(mesh_port=MESH, mesh_join_cidrs=("10.9.0.0/16",))
    assert verdict(opts, "10.9.9.9") == "accept"
    assert verdict(opts, "10.8.9.9") == "drop"
    assert verdict(opts, "2001:db8::9") == "drop"


def test_bad_join_cidr_is_refused():
    with pytest.raises(EnforcementError, match="mesh join CIDR"):
        RenderOptions(mesh_port=MESH, mesh_join_cidrs=("10.0.0.1/8",))


def test_sample_document_is_what_we_render():
    doc, _ = sample_document()
    assert POLICY.document == doc
