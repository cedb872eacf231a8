"""Deterministic authorities and node identities, for the simulator's scenarios and for tests.

Seeds are derived from labels with SHA-256, so every run builds the same keys and certificates: no
hidden randomness, and a seeded simulation replays exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from protocol.trust import (
    DAY_S,
    Authority,
    Certificate,
    decode_certificate,
    decode_envelope,
    public_key_of,
    x25519_public,
)

T0 = 1_800_000_000  # a fixed "now" (2027-01-15) for simulations and tests


def derive_seed(*labels: object) -> bytes:
    """32 bytes of key seed named by ``labels`` (the same labels give the same seed)."""
    return hashlib.sha256("/".join(str(x) for x in labels).encode()).digest()


@dataclass(frozen=True)
class NodeIdentity:
    """An enrolled node: its signed certificate (bytes and decoded) and the seeds of its two keys."""

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
    """An in-memory authority whose root, policy and enroll keys are derived from ``label``."""
    seeds = {
        "root": [derive_seed(label, "root", i) for i in range(root_keys)],
        "policy": [derive_seed(label, "policy", i) for i in range(policy_keys)],
        "enroll": [derive_seed(label, "enroll", i) for i in range(enroll_keys)],
    }
    thresholds = {"root": root_threshold, "policy": policy_threshold, "enroll": enroll_threshold}
    return Authority.create(cluster, seeds, thresholds, now, expires_in_s)


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
    """Enroll ``node_id`` with ``auth``: keys derived from (label, cluster, node id), valid from a minute
    before ``now`` (or ``not_before``) for ``valid_s``."""
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
        cert_id=hashlib.sha256(f"{auth.cluster}/{node_id}/{label}/cert".encode()).hexdigest()[:16],
    )
    cert = decode_certificate(decode_envelope(cert_bytes, "cert").payload)
    return NodeIdentity(node_id, cert_bytes, ident, static, cert)
