"""What the node starts from: its stored state, re-verified, and the gossip node built on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import TrustError
from protocol.gossip import GossipConfig, MemberEntry, Node
from protocol.trust import Certificate, TrustedState

from .. import transport
from ..config import LoadedConfig
from ..enforcer import Enforcer
from ..identity import Identity
from ..metrics import Metrics
from ..state import StateStore


@dataclass(frozen=True, slots=True)
class StoredMembers:
    """The stored member file: as read, for the core (which re-verifies it), and the certificates that
    verified now (this node's own included), which the boot apply enforces before the core exists."""

    entries: list[MemberEntry]
    certificates: dict[str, Certificate]


def load_state(*, trust: TrustedState, store: StateStore, identity: Identity, metrics: Metrics, log: Any,
               alert: Callable[[str, dict[str, Any]], None]) -> StoredMembers:
    """Load the stored roots and policy into ``trust`` and read the member file, re-verifying each; a
    corrupt or unverifiable file is counted and logged, never fatal."""
    now = time.time()
    report = store.load_into(trust, now)
    for problem in report.problems:
        metrics.state_problems.inc()
        log.warning("state.problem", problem=problem)
    log.info("state.loaded", root_version=trust.root_version, serial=trust.serial,
             roots_loaded=report.roots_loaded, policy_state=trust.policy_state(now))
    entries = store.load_members()
    certificates: dict[str, Certificate] = {}
    for entry in entries:
        try:
            cert = trust.verify_certificate(entry.cert, now)
        except TrustError as exc:
            log.info("state.member_dropped", member=entry.node_id, reason=str(exc))
            continue
        if cert.node_id == entry.node_id:
            certificates[entry.node_id] = cert
    certificates[identity.node_id] = identity.cert
    try:
        trust.verify_certificate(identity.cert_bytes, now)
    except TrustError as exc:
        # Keep enforcing the last-known-good policy (fail-static), but say loudly that peers will refuse us.
        alert("node.certificate_invalid", {"reason": exc.reason, "error": str(exc)})
    return StoredMembers(entries, certificates)


def make_node(*, config: LoadedConfig, trust: TrustedState, identity: Identity, advertise: str,
              known_members: list[MemberEntry], enforcer: Enforcer) -> Node:
    cfg = config.cfg
    return Node(
        config=GossipConfig.from_mapping(dict(cfg.gossip)),
        trust=trust,
        node_id=identity.node_id,
        cert_bytes=identity.cert_bytes,
        identity_seed=identity.identity_seed,
        advertise=advertise,
        seeds=list(cfg.mesh.seeds),
        entropy=transport.entropy,
        known_members=known_members,
        # what the boot apply already enforces (its RulesetApplied came before the node existed)
        enforced=(enforcer.applied_serial, enforcer.applied_hash or ""),
    )
