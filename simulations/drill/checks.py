"""The chaos-drill invariants, checked continuously and identically in the simulator and on real daemons.

Both modes feed the same observations: ``sample`` (each node's enforced version, what its status
claims and what its kernel holds, every few hundred ms), ``kernel_gap`` (a moment the kernel held no
ruleset of ours between two samples: real mode sees it in ``nft monitor``), ``acknowledged`` (a
publish the operator got an acknowledgement for), ``alert`` (one trigger or resolve), and ``finish``.

The invariants (names as in the report's ``invariants``):

* ``no_acknowledged_version_lost``: the node that acknowledged serial S enforces >= S whenever it is
  up (across kill -9 and restart too), and at the end every live node enforces >= every acknowledged S.
* ``enforced_version_monotonic``: a node's enforced ``(root_version, serial)`` never decreases, across
  restarts too.
* ``kernel_holds_ruleset``: once a node enforced a policy, its kernel holds our ruleset at every sample
  and in between; the only allowed gap is the one a ``flush_ruleset`` fault makes on its node, and it
  must be repaired within ``FLUSH_REPAIR_MS``.
* ``converged_after_heal``: after the last fault heals, every live node reaches the last published
  serial before the run ends.
* ``status_matches_kernel``: a node's status never claims a ruleset that its kernel does not hold for
  longer than ``STATUS_GRACE_MS`` (the drift check's detection time).
* ``alerts_one_per_episode``: each fault episode that maps to an alert (``flush_ruleset`` ->
  ``enforce.drift``, ``disk_full`` -> ``state.write_failed``) triggers it at most once and resolves it
  as often as it triggered (``flush_ruleset``: exactly once each); those checks never fire outside
  such an episode.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .schedule import FLUSH_REPAIR_MS, Episode

SAMPLE_MS = 250  # both modes sample every node this often
STATUS_GRACE_MS = 3000
ALERT_SETTLE_MS = 15_000  # an episode's alert may resolve this long after the fault heals
MAX_LISTED = 20
INVARIANTS = ("no_acknowledged_version_lost", "enforced_version_monotonic", "kernel_holds_ruleset",
              "converged_after_heal", "status_matches_kernel", "alerts_one_per_episode")
EPISODE_ALERTS = {"flush_ruleset": "enforce.drift", "disk_full": "state.write_failed"}


@dataclass
class Sample:
    """One node at one moment.  ``enforced``: (root_version, serial) the node enforces (None: down or
    unknown); ``claimed``: the ruleset identity its status claims (None: none claimed); ``kernel``: the
    ruleset identity its kernel holds (None: no ruleset of ours)."""

    up: bool
    enforced: tuple[int, int] | None = None
    claimed: str | None = None
    kernel: str | None = None


@dataclass
class _Node:
    best: tuple[int, int] = (0, 0)
    ever_enforced: bool = False
    acked: int = 0  # the highest serial this node acknowledged
    mismatch_since: int | None = None
    last_enforced: tuple[int, int] | None = None


@dataclass
class DrillChecks:
    ids: list[str]
    episodes: list[Episode]
    seed: int
    samples: int = 0
    results: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in INVARIANTS})
    alerts: list[tuple[int, str, str, str]] = field(default_factory=list)  # (ms, node, check, action)
    gaps: list[tuple[int, int, str]] = field(default_factory=list)  # (from ms, to ms, node)
    acked: dict[int, int] = field(default_factory=dict)  # serial -> ms of the acknowledgement

    def __post_init__(self) -> None:
        self.nodes = [_Node() for _ in self.ids]
        self.lock = threading.Lock()  # real mode: one sampler thread per node
        self.quiet: set[tuple[int, int]] = set()  # (ms, node): a fault that hit a node not running

    def violation(self, name: str, at_ms: int, text: str) -> None:
        self.counts[name] += 1
        if len(self.results[name]) < MAX_LISTED:
            self.results[name].append(f"t={at_ms}ms seed={self.seed}: {text}")

    # -- observations --------------------------------------------------------------------------------
    def acknowledged(self, at_ms: int, node: int, serial: int) -> None:
        with self.lock:
            self.acked.setdefault(serial, at_ms)
            st = self.nodes[node]
            st.acked = max(st.acked, serial)

    def sample(self, at_ms: int, node: int, s: Sample) -> None:
        with self.lock:
            self.samples += 1
            st, nid = self.nodes[node], self.ids[node]
            if not s.up or s.enforced is None:
                st.mismatch_since = None
                return
            if s.enforced < st.best:
                self.violation("enforced_version_monotonic", at_ms,
                               f"{nid} enforces {s.enforced} after {st.best}")
            st.best = max(st.best, s.enforced)
            st.last_enforced = s.enforced
            if s.enforced[1] < st.acked:
                self.violation("no_acknowledged_version_lost", at_ms,
                               f"{nid} acknowledged serial {st.acked} but enforces {s.enforced[1]}")
            if s.enforced[1] > 0:
                st.ever_enforced = True
            if st.ever_enforced and s.kernel is None and not self._flush_allows(node, at_ms):
                self.violation("kernel_holds_ruleset", at_ms, f"{nid}: the kernel holds no ruleset of ours")
            if s.claimed is not None and s.claimed != s.kernel:
                if st.mismatch_since is None:
                    st.mismatch_since = at_ms
                elif at_ms - st.mismatch_since > STATUS_GRACE_MS and not self._flush_allows(node, at_ms):
                    self.violation("status_matches_kernel", at_ms,
                                   f"{nid}: status claims ruleset {s.claimed[:12]} since {st.mismatch_since} ms, "
                                   f"the kernel holds {(s.kernel or 'nothing')[:12]}")
                    st.mismatch_since = at_ms  # one violation per grace period, not per sample
            else:
                st.mismatch_since = None

    def kernel_gap(self, start_ms: int, end_ms: int, node: int) -> None:
        """The kernel held no ruleset of ours on ``node`` from ``start_ms`` to ``end_ms``."""
        with self.lock:
            self.gaps.append((start_ms, end_ms, self.ids[node]))
            if not self.nodes[node].ever_enforced:
                return
            allowed = any(e.kind == "flush_ruleset" and node in e.nodes and e.start_ms <= start_ms
                          and end_ms <= e.start_ms + FLUSH_REPAIR_MS for e in self.episodes)
            if not allowed:
                self.violation("kernel_holds_ruleset", start_ms, f"{self.ids[node]}: no ruleset of ours in the "
                                                                 f"kernel for {end_ms - start_ms} ms")

    def no_alert_expected(self, at_ms: int, node: int) -> None:
        """The fault starting now on ``node`` hit a node that was not running (its alert cannot come)."""
        with self.lock:
            self.quiet.add((at_ms, node))

    def alert(self, at_ms: int, node: int, check: str, action: str) -> None:
        with self.lock:
            self.alerts.append((at_ms, self.ids[node], check, action))

    def _flush_allows(self, node: int, at_ms: int) -> bool:
        return any(e.kind == "flush_ruleset" and node in e.nodes and e.start_ms <= at_ms <= e.start_ms + FLUSH_REPAIR_MS
                   for e in self.episodes)

    # -- the end -------------------------------------------------------------------------------------
    def finish(self, at_ms: int, live: list[int], final: dict[int, tuple[int, int] | None], last_serial: int,
               heal_ms: int, require_convergence: bool = True) -> dict[str, Any]:
        """``final``: each live node's enforced version at the end; ``last_serial``: the last published."""
        with self.lock:
            top_acked = max(self.acked, default=0)
            for i in live:
                got = final.get(i)
                serial = got[1] if got else -1
                if serial < top_acked:
                    self.violation("no_acknowledged_version_lost", at_ms,
                                   f"{self.ids[i]} ends on serial {serial}, serial {top_acked} was acknowledged")
                if require_convergence and serial < last_serial:
                    self.violation("converged_after_heal", at_ms,
                                   f"{self.ids[i]} ends on serial {serial}, not {last_serial} "
                                   f"(the last fault healed at {heal_ms} ms)")
            self._check_alerts(at_ms)
            return self.report()

    def _check_alerts(self, end_ms: int) -> None:
        claimed: set[int] = set()
        for e in self.episodes:
            check = EPISODE_ALERTS.get(e.kind)
            if check is None:
                continue
            stop = (end_ms if e.end_ms is None else e.end_ms) + ALERT_SETTLE_MS
            for node in e.nodes:
                nid = self.ids[node]
                mine = [(k, a) for k, a in enumerate(self.alerts)
                        if a[1] == nid and a[2] == check and e.start_ms <= a[0] <= stop]
                claimed.update(k for k, _ in mine)
                trig = sum(1 for _, a in mine if a[3] == "trigger")
                res = sum(1 for _, a in mine if a[3] == "resolve")
                down = any(node == q and e.start_ms <= at <= e.start_ms + 1000 for at, q in self.quiet)
                want_one = e.kind == "flush_ruleset" and not down
                if trig > 1 or res != trig or (want_one and trig != 1):
                    self.violation("alerts_one_per_episode", e.start_ms,
                                   f"{nid}: {e.kind} episode {e.name!r} gave {trig} trigger(s) and {res} "
                                   f"resolve(s) of {check}")
        wanted = set(EPISODE_ALERTS.values())
        for k, (at, nid, check, action) in enumerate(self.alerts):
            if check in wanted and k not in claimed:
                self.violation("alerts_one_per_episode", at, f"{nid}: {check} {action} outside any fault episode")

    def report(self) -> dict[str, Any]:
        return {name: {"ok": self.counts[name] == 0, "violations": self.counts[name], "listed": self.results[name]}
                for name in INVARIANTS}

    def failed(self) -> list[str]:
        return [name for name in INVARIANTS if self.counts[name]]

    def total(self) -> int:
        return sum(self.counts.values())
