"""The report of a real drill, in the simulator's schema (``simulations.report.build_report``): the same
keys, with ``null`` where real mode measures nothing comparable (bytes and messages per node, false
detections: the simulator counts them inside the model), plus the drill's keys shared by both modes
(``mode``, ``invariants``, ``fault_schedule``, ``fault_timeline``, ``drill``).

Times are wall-clock milliseconds from the start of the timeline; a node's apply time is the first
sample (every ``SAMPLE_MS``) that shows it enforcing the version, so real times are coarse by that much.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Protocol

from ..report import SERF_MODEL_MS, SLOWEST
from ..scenario import Scenario
from .checks import SAMPLE_MS, DrillChecks
from .schedule import Episode, fault_windows


class RealDrill(Protocol):
    """What the report reads of a finished real drill (``simulations.drill.real.RealDrill``), so this
    module does not import the drill that imports it."""

    sc: Scenario
    n: int
    regions: list[str]
    ids: list[str]
    episodes: list[Episode]
    checks: DrillChecks
    timeline: list[dict[str, Any]]
    history: list[list[tuple[int, bool, int, int | None]]]  # per node: (ms, up, serial, applied_at)
    latest: list[dict[str, Any] | None]
    published: dict[int, int]
    alert_counts: dict[str, int]
    kills: int
    restarts: int
    policy_bytes: int


def applied_at(history: list[tuple[int, bool, int, int | None]], serial: int, since: int) -> int | None:
    """When the node applied ``serial`` (or a later one): what its status says (``applied_at``) when the
    first sample showing it has exactly that serial, else that sample's time."""
    for t, up, s, applied in history:
        if up and s >= serial:
            exact = applied if s == serial and applied is not None else None
            return max(since, exact) if exact is not None else max(since, t)
    return None


def version_stats(drill: RealDrill, serial: int, live: list[int]) -> dict[str, Any]:
    sc = drill.sc
    publish_ms = sorted(sc.policy.publish_at_ms)[serial - 2]
    pub = drill.published.get(serial)
    out: dict[str, Any] = {"serial": serial, "publish_ms": publish_ms, "published_at_ms": pub}
    empty: dict[str, Any] = dict(converged_fraction=0.0, t50_ms=None, t99_ms=None, t100_ms=None, bytes_per_node=None,
                 messages_per_node=None, dissemination_bytes_per_node=None, bytes_by_kind=None,
                 by_region={}, slowest=[])
    if pub is None or not live:
        out.update(empty)
        return out
    at = {i: applied_at(drill.history[i], serial, pub) for i in live}
    times = sorted(t - pub for t in at.values() if t is not None)

    def pct(p: float) -> int | None:
        need = math.ceil(p * len(live))
        return times[need - 1] if 0 < need <= len(times) else None

    by_region = {}
    for r, name in enumerate(drill.regions):
        lr = [i for i in live if i % len(drill.regions) == r]
        tr = sorted(at[i] - pub for i in lr if at[i] is not None)  # type: ignore[operator]
        by_region[name] = {"live": len(lr), "converged": len(tr), "t100_ms": tr[-1] if lr and len(tr) == len(lr) else None}
    slow = heapq.nsmallest(SLOWEST, ((t - pub, i) for i, t in at.items() if t is not None), key=lambda x: (-x[0], x[1]))
    out.update(empty, converged_fraction=round(len(times) / len(live), 6), t50_ms=pct(0.5), t99_ms=pct(0.99),
               t100_ms=times[-1] if len(times) == len(live) else None, by_region=by_region,
               slowest=[_straggler(drill, i, d, pub) for d, i in slow])
    return out


def _straggler(drill: RealDrill, i: int, delay: int, pub: int) -> dict[str, Any]:
    """One of a version's slowest daemons (as the simulator's report names them): a daemon seen down
    after the publish and up again before it applied the version says when it came back."""
    out: dict[str, Any] = {"node": drill.ids[i], "region": drill.regions[i % len(drill.regions)], "ms": delay}
    was_down = False
    for t, up, _s, _applied in drill.history[i]:
        if t < pub:
            continue
        if t > pub + delay:
            break
        if not up:
            was_down = True
        elif was_down:
            out["restarted_ms"] = t
            break
    return out


def real_report(drill: RealDrill, invariants: dict[str, Any], live: list[int], wall_s: float) -> dict[str, Any]:
    sc = drill.sc
    versions = [version_stats(drill, s, live) for s in range(2, len(sc.policy.publish_at_ms) + 2)]
    last = versions[-1]
    last_serial = last["serial"]
    missing = [i for i in live if (drill.latest[i] or {}).get("enforcement", {}).get("applied_serial", 0) < last_serial]
    failed = [name for name, r in invariants.items() if not r["ok"]]
    listed = [f"{name}: {v}" for name in failed for v in invariants[name]["listed"]]
    return {
        "scenario": sc.name,
        "protocol": "gossip",
        "seed": sc.seed,
        "nodes": drill.n,
        "regions": drill.regions,
        "loss": sc.network.loss,
        "transport": "tcp",
        "policy_bytes": drill.policy_bytes,
        "duration_ms": sc.duration_ms,
        "live_nodes": len(live),
        "not_converged_at_end": len(missing),
        "hostile_nodes": 0,
        "hostile_behaviours": [],
        "bodies_to_hostile": 0,
        "convergence_bound_ms": sc.checks.convergence_bound_ms or None,
        "equivocation": None,
        "converged_fraction": last["converged_fraction"],
        "t50_ms": last["t50_ms"],
        "t99_ms": last["t99_ms"],
        "t100_ms": last["t100_ms"],
        "bytes_per_node": None,
        "messages_per_node": None,
        "dissemination_bytes_per_node": None,
        "bytes_budget_per_node": int(1.2 * drill.policy_bytes + 2048),
        "idle_bytes_per_node_s": None,
        "idle_bytes_per_node_s_by_kind": {},
        "run_bytes_per_node": None,
        "run_messages_per_node": None,
        "bytes_by_kind": {},
        "serf_model_ms": SERF_MODEL_MS,
        "ratio_vs_serf_model": round(last["t100_ms"] / SERF_MODEL_MS, 3) if last["t100_ms"] is not None else None,
        "false_detections": None,
        "false_detections_per_node_hour": None,
        "false_suspicions": None,
        "deaths_declared": None,
        "alerts": dict(sorted(drill.alert_counts.items())),
        "faults": fault_windows(sc),
        "versions": versions,
        "events": None,
        "wall_s": round(wall_s, 3),
        "invariant_violations": sum(r["violations"] for r in invariants.values()),
        "violations": listed[:20],
        "mode": "real",
        "invariants": invariants,
        "fault_schedule": [e.to_json(drill.ids) for e in drill.episodes],
        "fault_timeline": drill.timeline,
        "drill": {
            "samples": drill.checks.samples,
            "sample_ms": SAMPLE_MS,
            "kills": drill.kills,
            "restarts": drill.restarts,
            "kernel_gaps": [{"from_ms": a, "to_ms": b, "node": n} for a, b, n in drill.checks.gaps],
            "alert_events": len(drill.checks.alerts),
            "not_emulated": ["latency", "jitter", "duplication", "reordering", "bandwidth"],
            "nodes_capped_from": sc.nodes.count if drill.n < sc.nodes.count else None,
        },
    }


def series(drill: RealDrill, step_ms: int = 250) -> tuple[list[int], dict[str, list[float | None]]]:
    """Converged fraction per region over time (live nodes on the newest published version)."""
    ts = list(range(0, drill.sc.duration_ms + 1, step_ms))
    out: dict[str, list[float | None]] = {name: [] for name in drill.regions}
    pubs = sorted((ms, s) for s, ms in drill.published.items())
    idx = [0] * drill.n
    state: list[tuple[bool, int]] = [(False, 0)] * drill.n
    for t in ts:
        for i in range(drill.n):
            h = drill.history[i]
            while idx[i] < len(h) and h[idx[i]][0] <= t:
                state[i] = (h[idx[i]][1], h[idx[i]][2])  # (up, serial)
                idx[i] += 1
        cur = max((s for ms, s in pubs if ms <= t), default=None)
        for r, name in enumerate(drill.regions):
            live = [i for i in range(drill.n) if i % len(drill.regions) == r and state[i][0]]
            if not live:
                out[name].append(None)
            elif cur is None:
                out[name].append(0.0)
            else:
                out[name].append(sum(1 for i in live if state[i][1] >= cur) / len(live))
    return ts, out
