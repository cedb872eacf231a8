"""What the node starts from: its stored state, re-verified, and the gossip node built on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from protocol.errors import TrustError
from protocol.gossip_config import GossipConfig
from protocol.node import Node
from protocol.trust import TrustedState

from .. import transport
from ..config import LoadedConfig
from ..enforcer import Enforcer
from ..identity import Identity
from ..metrics import Metrics
from ..state import StateStore
from .members import MemberCertificates


def load_state(*, trust: TrustedState, store: StateStore, identity: Identity, members: MemberCertificates,
               metrics: Metrics, log: Any, alert: Callable[[str, dict[str, Any]], None]) -> None:
    """Load the stored roots, policy and member directory into ``trust`` and ``members``, re-verifying
    each; a corrupt or unverifiable file is counted and logged, never fatal."""
    now = time.time()
    report = store.load_into(trust, now)
    for problem in report.problems:
        metrics.state_problems.inc()
        log.warning("state.problem", problem=problem)
    log.info("state.loaded", root_version=trust.root_version, serial=trust.serial,
             roots_loaded=report.roots_loaded, policy_state=trust.policy_state(now))
    stored: dict[str, bytes] = {}
    for node_id, cert_bytes in store.load_members().items():
        try:
            cert = trust.verify_certificate(cert_bytes, now)
        except TrustError as exc:
            log.info("state.member_dropped", member=node_id, reason=str(exc))
            continue
        if cert.node_id == node_id:
            stored[node_id] = cert_bytes
    stored[identity.node_id] = identity.cert_bytes
    members.replace(stored)
    try:
        trust.verify_certificate(identity.cert_bytes, now)
    except TrustError as exc:
        # Keep enforcing the last-known-good policy (fail-static), but say loudly that peers will refuse us.
        alert("node.certificate_invalid", {"reason": exc.reason, "error": str(exc)})


def stored_peers(store: StateStore, metrics: Metrics, log: Any) -> list[dict[str, Any]]:
    """The peer list persisted by the core (msgpack of [{node_id, address, region, cert}]); a corrupt
    file is reported and ignored, never fatal: seeds still work. The core re-verifies every certificate
    in it."""
    data = store.load_peers()
    if not data:
        return []
    try:
        return msgspec.msgpack.decode(data, type=list[dict[str, Any]])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        metrics.state_problems.inc()
        log.warning("state.problem", problem=f"{store.peers_path}: unreadable peer list: {exc}")
        return []


def make_node(*, config: LoadedConfig, trust: TrustedState, identity: Identity, advertise: str,
              known_peers: list[dict[str, Any]], enforcer: Enforcer) -> Node:
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
        known_peers=known_peers,
        # what the boot apply already enforces (its RulesetApplied came before the node existed)
        enforced=(enforcer.applied_serial, enforcer.applied_hash or ""),
    )
