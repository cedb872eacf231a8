"""The report of a run: the JSON document (byte-identical for the same seed apart from ``wall_s``),
built from the measurement at the end of the run, and the PNG plot of converged fraction over time per
region, with fault windows shaded."""

from __future__ import annotations

import heapq
import importlib.util
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .wire import KIND_NAMES

if TYPE_CHECKING:
    from .context import ReportSim
    from .hosts import Host, Version

DRILL_KEYS = ("mode", "invariants", "fault_schedule", "fault_timeline", "drill")
"""The chaos drill's report keys (#15), in both modes: tests/test_sim_pinned.py pins the rest."""
SERF_MODEL_MS = 2390  # memberlist/Serf convergence model: fanout 3, 200 ms interval, 10% loss, 99.99% of 1000


def build_report(sim: ReportSim) -> dict[str, Any]:
    """The report at the end of a run (after the end-of-run invariants)."""
    sc, n, m = sim.sc, sim.n, sim.measure
    live = sim.live_hosts()
    versions = [_version_stats(sim, v, live) for v in sim.versions]
    last = versions[-1]
    missing, equivocation = sim.end_checks(live)
    invariants = sim.drill.finish(live)
    drill = sim.drill.report_fields(invariants)
    # converged_after_heal is the simulator's own end check too (counted once, above)
    drill_violations = sum(r["violations"] for name, r in invariants.items() if name != "converged_after_heal")
    drill_listed = [f"{name}: {v}" for name, r in invariants.items() if name != "converged_after_heal"
                    for v in r["listed"]]
    idle_bps = None
    if m.idle_snap is not None and sim.versions[0].snap_publish is not None:
        dt = (sim.versions[0].published_at or 0) - m.idle_snap_t
        if dt > 0:
            idle_bps = round((sim.versions[0].snap_publish[0] - m.idle_snap[0]) / n / (dt / 1000), 1)
    node_hours = len(live) * sc.duration_ms / 3_600_000
    return {
        "scenario": sc.name,
        "protocol": sc.protocol,
        "seed": sc.seed,
        "nodes": n,
        "regions": sim.regions,
        "loss": sc.network.loss,
        "transport": sc.network.transport,
        **({"datagrams": dict(sim.datagram_counts)} if sc.network.transport == "mixed" else {}),
        "policy_bytes": sim.policy_bytes,
        "duration_ms": sc.duration_ms,
        "live_nodes": len(live),
        "not_converged_at_end": len(missing),
        "hostile_nodes": sum(1 for h in sim.hosts[:n] if h.hostile),
        "hostile_behaviours": sorted(sc.hostile.behaviours) if sim.hostile_idx else [],
        "bodies_to_hostile": sim.bodies_to_hostile,
        "convergence_bound_ms": sc.checks.convergence_bound_ms or None,
        "equivocation": equivocation,
        "converged_fraction": last["converged_fraction"],
        "t50_ms": last["t50_ms"],
        "t99_ms": last["t99_ms"],
        "t100_ms": last["t100_ms"],
        "bytes_per_node": last["bytes_per_node"],
        "messages_per_node": last["messages_per_node"],
        "dissemination_bytes_per_node": last["dissemination_bytes_per_node"],
        "bytes_budget_per_node": int(1.2 * sim.policy_bytes + 2048),
        "idle_bytes_per_node_s": idle_bps,
        "idle_bytes_per_node_s_by_kind": m.idle_by_kind,
        "run_bytes_per_node": round(sum(m.recv_bytes[:n]) / n, 1),
        "run_messages_per_node": round(sum(m.recv_msgs[:n]) / n, 1),
        "bytes_by_kind": {name: m.kind_bytes[k] for k, name in KIND_NAMES.items() if m.kind_bytes[k]},
        "serf_model_ms": SERF_MODEL_MS,
        "ratio_vs_serf_model": (round(last["t100_ms"] / SERF_MODEL_MS, 3) if last["t100_ms"] is not None else None),
        "false_detections": m.false_detections,
        "false_detections_per_node_hour": round(m.false_detections / node_hours, 4) if node_hours else 0.0,
        "false_suspicions": m.false_suspicions,
        "deaths_declared": m.deaths,
        "alerts": dict(sorted(m.alerts.items())),
        "faults": [{"name": name, "start_ms": s, "end_ms": e} for s, e, name in sim.faults.windows],
        "versions": versions,
        "events": sim.kernel.events,
        "wall_s": round(sim.wall_s, 3),
        "invariant_violations": sim.inv.count + drill_violations,
        "violations": sim.inv.listed + drill_listed[:20],
        **drill,
    }


def _delay(v: Version, h: Host, pub: int) -> int:
    """How long host ``h`` took to apply version ``v``: from the publish, or, for a node that joined the
    fleet (first started) after the publish, from its join: it could not have had the version any
    earlier, and counting its absence as propagation time would make t100 the join time of the last
    joiner.  A node that was down and restarted still counts from the publish."""
    at = v.applied[h.idx]
    joined = h.joined_ms
    return at - (joined if joined is not None and pub < joined <= at else pub)


def _version_stats(sim: ReportSim, v: Version, live: list[Host]) -> dict[str, Any]:
    n = sim.n
    pub = v.published_at
    out: dict[str, Any] = {"serial": v.serial, "publish_ms": v.publish_ms, "published_at_ms": pub}
    if pub is None or not live:
        out.update(converged_fraction=0.0, t50_ms=None, t99_ms=None, t100_ms=None, bytes_per_node=None,
                   messages_per_node=None, dissemination_bytes_per_node=None, bytes_by_kind={},
                   by_region={}, slowest=[])
        return out
    delay = {h.idx: _delay(v, h, pub) for h in live if h.idx in v.applied}
    times = sorted(delay.values())
    frac = len(times) / len(live)

    def pct(p: float) -> int | None:
        need = math.ceil(p * len(live))
        return times[need - 1] if need <= len(times) and need > 0 else None

    snap_end = v.snap_done if v.snap_done is not None else sim.measure.snapshot()
    sp = v.snap_publish or [0, 0, 0]
    by_region = {}
    for r, name in enumerate(sim.regions):
        lr = [h for h in live if h.region == r]
        tr = sorted(delay[h.idx] for h in lr if h.idx in delay)
        by_region[name] = {"live": len(lr), "converged": len(tr),
                           "t100_ms": tr[-1] if lr and len(tr) == len(lr) else None}
    slow = heapq.nsmallest(SLOWEST, ((d, sim.hosts[i]) for i, d in delay.items()), key=lambda x: (-x[0], x[1].idx))
    out.update(
        converged_fraction=round(frac, 6), t50_ms=pct(0.5), t99_ms=pct(0.99),
        t100_ms=times[-1] if len(times) == len(live) else None,
        bytes_per_node=round((snap_end[0] - sp[0]) / n, 1),
        messages_per_node=round((snap_end[1] - sp[1]) / n, 2),
        dissemination_bytes_per_node=round((snap_end[2] - sp[2]) / n, 1),
        bytes_by_kind=_kinds(sim, v),
        by_region=by_region,
        slowest=[_straggler(sim, v, h, d, pub) for d, h in slow],
    )
    return out


def _kinds(sim: ReportSim, v: Version) -> dict[str, float]:
    """Bytes received per node in the version's window (publish to every live node applied) by message
    kind, largest first: what ``bytes_per_node`` is made of."""
    m, n = sim.measure, sim.n
    end = v.kinds_done if v.kinds_done is not None else m.kind_bytes
    start = v.kinds_publish or [0] * len(end)
    got = {KIND_NAMES[k]: round((end[k] - start[k]) / n, 1) for k in KIND_NAMES if end[k] != start[k]}
    return dict(sorted(got.items(), key=lambda kv: (-kv[1], kv[0])))


SLOWEST = 3  # the report names this many of each version's slowest nodes


def _straggler(sim: ReportSim, v: Version, h: Host, delay: int, pub: int) -> dict[str, Any]:
    """One of a version's slowest nodes: who, where, how long, and whether it joined or restarted
    after the publish (a joiner counts from its join, see ``_delay``)."""
    out: dict[str, Any] = {"node": h.node_id, "region": sim.regions[h.region], "ms": delay}
    if h.joined_ms is not None and pub < h.joined_ms <= v.applied[h.idx]:
        out["joined_ms"] = h.joined_ms
    elif h.started_ms > pub:
        out["restarted_ms"] = h.started_ms
    return out


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(to_json(report))


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed (it comes with the ``[sim]`` extra)."""


def require_plotting() -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError(
            "--plot needs matplotlib: install the simulator extra (pip install -e '.[sim]')")


def plot(sim: ReportSim, report: dict[str, Any], path: str) -> None:
    plot_series(report, sim.measure.series_t, sim.measure.series, path)


def plot_series(report: dict[str, Any], series_t: list[int], series_in: dict[str, list[Any]], path: str) -> None:
    """Converged fraction per region over time (``series_t`` ms), the faults of ``report`` shaded; the
    simulator's and the real drill's (``meshsim run --real``) reports alike."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    ts = [t / 1000 for t in series_t]
    series = {region: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
              for region, values in series_in.items()}
    windows = [(f["start_ms"], f["end_ms"], f["name"]) for f in report["faults"]]
    real = report.get("mode") == "real"
    for region, values in series.items():
        ax.plot(ts, values, label=region, linewidth=1.4)
    for k, (start, end, label) in enumerate(windows):
        ax.axvspan(start / 1000, end / 1000, color="tab:red", alpha=0.12)
        ax.text(start / 1000, 1.02 + 0.03 * (k % 3), label, fontsize=7, color="tab:red", va="bottom")
    for v in report["versions"]:
        if v["published_at_ms"] is not None:
            ax.axvline(v["published_at_ms"] / 1000, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.16)
    ax.set_xlabel("wall-clock time (s), real daemons" if real else "virtual time (s)")
    ax.set_ylabel("live nodes on the newest published version")
    t100 = report["t100_ms"]
    ax.set_title(f"{report['scenario']} · {'REAL' if real else report['protocol']} · {report['nodes']} nodes · loss {report['loss']:.0%}"
                 f" · t100 {f'{t100} ms' if t100 is not None else 'n/a'} · seed {report['seed']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    # Zoom on the last published version: milliseconds from its publication.
    published = [v for v in report["versions"] if v["published_at_ms"] is not None]
    if published and series_t:
        v = published[-1]
        t0 = v["published_at_ms"]
        span = max(1000, int(1.3 * (v.get("t100_ms") or 3000)))
        idx = [i for i, t in enumerate(series_t) if t0 - 200 <= t <= t0 + span]
        for region, values in series.items():
            zoom.plot([series_t[i] - t0 for i in idx], [values[i] for i in idx], label=region,
                      linewidth=1.4, drawstyle="steps-post")
        for start, end, _label in windows:
            if start < t0 + span and end > t0 - 200:
                zoom.axvspan(max(start, t0 - 200) - t0, min(end, t0 + span) - t0, color="tab:red", alpha=0.12)
        zoom.axvline(0, color="grey", linestyle=":", linewidth=1)
        zoom.set_ylim(-0.02, 1.1)
        zoom.set_xlabel(f"ms after serial {v['serial']} was published")
        zoom.set_title(f"zoom: t50 {v.get('t50_ms')} ms · t99 {v.get('t99_ms')} ms · t100 {v.get('t100_ms')} ms",
                       fontsize=9)
        zoom.grid(alpha=0.3)
    else:
        zoom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
