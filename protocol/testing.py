"""Deterministic in-memory authority and node identities for tests and the simulator.

Seeds are derived from a label with SHA-256, so every run builds the same keys: no hidden randomness.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .authority import DAY_S, Authority, x25519_public
from .metadata import Certificate, decode_certificate
from .policy import PolicyDocument, Revocations, parse_policy_toml
from .signing import decode_envelope, public_key_of

T0 = 1_800_000_000  # a fixed "now" (2027-01-15) for tests


def derive_seed(*labels: object) -> bytes:
    return hashlib.sha256("/".join(str(x) for x in labels).encode()).digest()


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    cert_bytes: bytes
    identity_seed: bytes
    static_private: bytes
    cert: Certificate


def make_authority(
    cluster: str = "test",
    label: str = "authority",
    root_keys: int = 1,
    root_threshold: int = 1,
    policy_keys: int = 1,
    policy_threshold: int = 1,
    enroll_keys: int = 1,
    enroll_threshold: int = 1,
    now: int = T0,
    expires_in_s: int = 365 * DAY_S,
) -> Authority:
    seeds = {
        "root": [derive_seed(label, "root", i) for i in range(root_keys)],
        "policy": [derive_seed(label, "policy", i) for i in range(policy_keys)],
        "enroll": [derive_seed(label, "enroll", i) for i in range(enroll_keys)],
    }
    ths = {"root": root_threshold, "policy": policy_threshold, "enroll": enroll_threshold}
    return Authority.create(cluster, seeds, ths, now, expires_in_s)


def make_node(
    auth: Authority,
    node_id: str,
    region: str = "r1",
    roles: tuple[str, ...] = ("app",),
    addresses: tuple[str, ...] = ("127.0.0.1",),
    now: int = T0,
    valid_s: int = 365 * DAY_S,
    label: str = "node",
    not_before: int | None = None,
) -> NodeIdentity:
    ident = derive_seed(label, auth.cluster, node_id, "identity")
    static = derive_seed(label, auth.cluster, node_id, "static")
    cert_bytes = auth.enroll(
        node_id=node_id,
        region=region,
        roles=roles,
        addresses=addresses,
        identity_public=public_key_of(ident),
        static_public=x25519_public(static),
        not_before=now - 60 if not_before is None else not_before,
        not_after=now + valid_s,
        cert_id=hashlib.sha256(cert_label(auth.cluster, node_id, label).encode()).hexdigest()[:16],
    )
    cert = decode_certificate(decode_envelope(cert_bytes, "cert").payload)
    return NodeIdentity(node_id, cert_bytes, ident, static, cert)


def cert_label(cluster: str, node_id: str, label: str) -> str:
    return f"{cluster}/{node_id}/{label}/cert"


SAMPLE_POLICY_TOML = """
[defaults]
inbound = "drop"
mode = "enforce"

[[allow]]
name = "app-to-db"
from = ["role:app"]
to = ["role:db"]
ports = ["tcp/5432"]

[[allow]]
name = "web-to-app"
from = ["role:web"]
to = ["role:app"]
ports = ["tcp/8080", "tcp/9000-9010"]
"""


def sample_document() -> tuple[PolicyDocument, Revocations]:
    return parse_policy_toml(SAMPLE_POLICY_TOML)


def sign_sample(
    auth: Authority,
    serial: int,
    now: int = T0,
    valid_s: int = 7 * DAY_S,
    document: PolicyDocument | None = None,
    revocations: Revocations | None = None,
) -> bytes:
    doc, rev = sample_document()
    return auth.sign_policy(document or doc, serial, now, now + valid_s, revocations or rev)
