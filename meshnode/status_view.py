"""The cluster status table that `meshctl status` and the demo print, from a node's status document."""

from __future__ import annotations

import time
from typing import Any

SEVERITIES = ("critical", "error", "warning", "info")


def members_of(status: dict[str, Any]) -> list[dict[str, Any]]:
    view = status.get("cluster_view") or {}
    members = view.get("members") or []
    return sorted(members, key=lambda m: (str(m.get("region", "")), str(m.get("node_id", ""))))


def format_status(status: dict[str, Any]) -> str:
    pol = status.get("policy", {})
    enf = status.get("enforcement", {})
    lines = [
        f"node {status.get('node')} (region {status.get('region')}, cluster {status.get('cluster')}): "
        f"policy serial {pol.get('serial')} [{pol.get('state')}], enforcing serial {enf.get('applied_serial')} "
        f"with {enf.get('backend')}" + (" (NOT ENFORCING: file backend override)" if not enf.get("enforcing", True) else ""),
    ]
    if status.get("overrides"):
        lines.append(f"active overrides: {', '.join(status['overrides'])}")
    dg = status.get("datagrams")
    if dg:
        stream_only = dg.get("peers_stream_only") or []
        lines.append(f"datagrams: udp {dg.get('udp')}, {len(dg.get('peers_datagram') or [])} peer(s) over UDP"
                     + (f", stream only (UDP blocked?): {', '.join(stream_only)}" if stream_only else ""))
    members = members_of(status)
    conv = (status.get("cluster_view") or {}).get("convergence") or {}
    if members:
        newest = max(int(m.get("serial") or 0) for m in members)
        newest = max(newest, int(pol.get("serial") or 0))
        judged = "converged" in members[0]  # the core judges convergence on enforced serial + hash
        lines.append("")
        lines.append(f"{'REGION':10s} {'NODE':16s} {'LIVENESS':9s} {'SERIAL':>7s} {'STATE':12s} {'RULESET':12s} CONVERGED")
        for m in members:
            serial = int(m.get("serial") or 0)
            ok = bool(m.get("converged")) if judged else serial >= newest
            lines.append(
                f"{m.get('region') or '-':10s} {m.get('node_id') or '-':16s} {m.get('liveness') or '-':9s} "
                f"{serial if m.get('serial') is not None else '-':>7} {m.get('state') or '-':12s} "
                f"{(m.get('ruleset_hash') or '-')[:12]:12s} {'yes' if ok else 'no'}"
            )
        done = sum(1 for m in members if (m.get("converged") if judged else int(m.get("serial") or 0) >= newest))
        target = conv.get("target_serial", newest) if judged else newest
        lines.append("")
        lines.append(f"{done}/{len(members)} members enforce serial {target}"
                     + (f" (hash {conv.get('target_hash')})" if judged and conv.get("target_hash") else ""))
    if members:
        lines += _validation_lines(members, time.time())
    eq = conv.get("equivocation")
    if eq:
        lines.append(f"EQUIVOCATION at serial {eq.get('serial')}: validly signed payloads "
                     f"{', '.join(eq.get('hashes') or [])}; every node keeps {eq.get('kept')} (the lower hash)"
                     + (f"; reported by {', '.join(eq['reported_by'])}" if eq.get("reported_by") else ""))
    return "\n".join(lines)


def validation_text(m: dict[str, Any], now: float) -> str:
    """``validated from outside by 2 peers, last 12 s ago; holes: tcp/9999 (seen by n1)`` for one member."""
    v = m.get("validated")
    if not v:
        return "not validated from outside yet"
    age = max(0, round(now - float(v.get("last_at") or 0)))
    text = f"validated from outside by {v.get('by')} peer(s), last at {_iso(v.get('last_at'))} ({age} s ago)"
    holes = [f"tcp/{h['port']} (seen by {h['by']})" for h in v.get("holes") or []]
    blocked = [f"tcp/{h['port']} (seen by {h['by']})" for h in v.get("blocked") or []]
    text += f"; holes: {', '.join(holes) if holes else 'none'}"
    if blocked:
        text += f"; blocked: {', '.join(blocked)}"
    return text


def alert_counts_text(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "alerts not reported"
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in SEVERITIES)


def _validation_lines(members: list[dict[str, Any]], now: float) -> list[str]:
    out = ["", "validation (signed statuses of the peers that probed each node; open alerts as each node reports):"]
    for m in members:
        out.append(f"  {m.get('node_id') or '-':16s} {validation_text(m, now)}; "
                   f"open alerts: {alert_counts_text(m.get('alerts_open'))}")
    return out


def _iso(at: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(at)))
    except (TypeError, ValueError, OverflowError):
        return "-"
