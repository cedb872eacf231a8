"""GossipConfig: every timer and knob of membership and dissemination, with units in the names.

Defaults suit a LAN or a WAN daemon; the daemon reads overrides from its config file, scenarios from
``[gossip]``.  Field names are the lower-case form of the ``*_MS`` constants below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

PROBE_INTERVAL_MS = 1000
PROBE_TIMEOUT_MS = 500
CROSS_REGION_PROBE_TIMEOUT_MS = 1500
INDIRECT_PROBES = 3
SUSPICION_MULT = 4
SUSPICION_MAX_MULT = 6
SUSPICION_CONFIRMATIONS = 3
MAX_LOCAL_HEALTH = 8
RETRANSMIT_MULT = 4
GOSSIP_BUDGET_BYTES = 1024
FANOUT = 3
ANNOUNCE_ROUNDS = 4
ANNOUNCE_INTERVAL_MS = 200
TREE_DEGREE = 6  # children per member in the broadcast tree (protocol.broadcast_tree)
EAGER_PUSH_MAX_BYTES = 65536  # larger envelopes are announced and pulled only; 0: no eager push
GRAFT_DELAY_MS = 200  # a newer version named by a probe or sync is pulled this long later (unless pushed)
PULL_TIMEOUT_MS = 450
CROSS_REGION_PULL_TIMEOUT_MS = 1200
SYNC_INTERVAL_MS = 5000
CROSS_REGION_SYNC_INTERVAL_MS = 15000
DEAD_RETRY_INTERVAL_MS = 5000
SEED_RETRY_INTERVAL_MS = 30000
SEED_RETRY_LONELY_MS = 2000
HOUSEKEEPING_INTERVAL_MS = 10000
DIRECTORY_DEBOUNCE_MS = 1000
DIRECTORY_DEBOUNCE_MAX_MS = 10000  # see directory_debounce_for
PEERS_PERSIST_INTERVAL_MS = 30000
SYNC_BUCKETS = 32
STATUS_SYNC_INTERVAL_MS = 20000
DIAL_ALLOWANCE_MS = 1500  # added to a probe timeout when no channel is open (TCP SYN RTO is 1 s)
ENFORCE_GRACE_MS = 30000  # trusted but not yet confirmed by the enforcer for this long: alert
VALIDATION_REFRESH_MS = 300000  # a new probe time alone re-signs our status at most this often
PULL_ANSWER_WINDOW_MS = 60000  # a body goes to one peer at most once per version in this window
# (again sooner only after the channel broke, unless we closed it for misbehaviour)


@dataclass(frozen=True, slots=True)
class GossipConfig:
    probe_interval_ms: int = PROBE_INTERVAL_MS
    probe_timeout_ms: int = PROBE_TIMEOUT_MS
    cross_region_probe_timeout_ms: int = CROSS_REGION_PROBE_TIMEOUT_MS
    indirect_probes: int = INDIRECT_PROBES
    suspicion_mult: int = SUSPICION_MULT
    suspicion_max_mult: int = SUSPICION_MAX_MULT
    suspicion_confirmations: int = SUSPICION_CONFIRMATIONS
    max_local_health: int = MAX_LOCAL_HEALTH
    retransmit_mult: int = RETRANSMIT_MULT
    gossip_budget_bytes: int = GOSSIP_BUDGET_BYTES
    fanout: int = FANOUT
    announce_rounds: int = ANNOUNCE_ROUNDS
    announce_interval_ms: int = ANNOUNCE_INTERVAL_MS
    tree_degree: int = TREE_DEGREE
    eager_push_max_bytes: int = EAGER_PUSH_MAX_BYTES
    graft_delay_ms: int = GRAFT_DELAY_MS
    pull_timeout_ms: int = PULL_TIMEOUT_MS
    cross_region_pull_timeout_ms: int = CROSS_REGION_PULL_TIMEOUT_MS
    sync_interval_ms: int = SYNC_INTERVAL_MS
    cross_region_sync_interval_ms: int = CROSS_REGION_SYNC_INTERVAL_MS
    dead_retry_interval_ms: int = DEAD_RETRY_INTERVAL_MS
    seed_retry_interval_ms: int = SEED_RETRY_INTERVAL_MS
    seed_retry_lonely_ms: int = SEED_RETRY_LONELY_MS
    housekeeping_interval_ms: int = HOUSEKEEPING_INTERVAL_MS
    directory_debounce_ms: int = DIRECTORY_DEBOUNCE_MS
    directory_debounce_max_ms: int = DIRECTORY_DEBOUNCE_MAX_MS
    peers_persist_interval_ms: int = PEERS_PERSIST_INTERVAL_MS
    sync_buckets: int = SYNC_BUCKETS
    status_sync_interval_ms: int = STATUS_SYNC_INTERVAL_MS
    dial_allowance_ms: int = DIAL_ALLOWANCE_MS
    enforce_grace_ms: int = ENFORCE_GRACE_MS
    pull_answer_window_ms: int = PULL_ANSWER_WINDOW_MS
    validation_refresh_ms: int = VALIDATION_REFRESH_MS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"gossip.{f.name} must be an integer, got {value!r}")
            if value < (0 if f.name in ("indirect_probes", "max_local_health", "eager_push_max_bytes") else 1):
                raise ValueError(f"gossip.{f.name} must be positive, got {value}")
        if not 1 <= self.sync_buckets <= 256:
            raise ValueError("gossip.sync_buckets must be 1..256")

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> GossipConfig:
        """Build from a config table; unknown keys are an error naming the key."""
        names = {f.name for f in fields(cls)}
        for key in data:
            if key not in names:
                raise ValueError(f"unknown gossip setting {key!r} (known: {', '.join(sorted(names))})")
        return cls(**data)  # type: ignore[arg-type]

    def retransmit_limit(self, members: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(members + 1)))

    def directory_debounce_for(self, members: int) -> int:
        """How long directory changes (joins, address changes) are gathered before enforcement hears
        of them: ``directory_debounce_ms``, plus 1 ms per member up to ``directory_debounce_max_ms``.
        Each change costs a render over the whole directory, so a 10,000-member node re-renders at
        most every 10 s during a mass join, not every second.  Revocations never wait."""
        return max(self.directory_debounce_ms, min(self.directory_debounce_max_ms, members))

    def suspicion_bounds_ms(self, members: int) -> tuple[int, int]:
        base = self.suspicion_mult * max(1.0, math.log10(max(members, 1))) * self.probe_interval_ms
        return int(base), int(base * self.suspicion_max_mult)
