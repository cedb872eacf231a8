"""The node's JSON status view, a pure function of what it holds: this node, its policy, every member,
and cluster convergence (for ``meshctl status``, the admin endpoint and the simulator)."""

from __future__ import annotations

from typing import Any

from protocol.gossip.events import Now
from protocol.gossip.member_table import ALIVE, DEAD, LEFT, LEFT_CODE, SUSPECT, MemberTable
from protocol.gossip.wire import HASH_PREFIX, SEVERITIES, StatusBody
from protocol.trust.state import TrustedState


def status_view(now: Now, trust: TrustedState, table: MemberTable, *, node_id: str, advertise: str,
                incarnation: int, local_health: int, enforced: tuple[int, str, bytes], state: str, not_enforced: bool,
                counters: dict[str, int]) -> dict[str, Any]:
    """A JSON-able view: this node, its policy, every member in ``table``, and cluster convergence.
    ``enforced`` is what the enforcer confirmed (serial, policy hash hex, ruleset hash prefix),
    ``state`` this node's policy state and ``not_enforced`` whether trusted-but-not-enforced alerted.

    Convergence is judged against the version this node *verified* (serial and hash), and a
    member counts as converged only on what it *enforces* (its enforcer's confirmation, from its
    signed status; for this node, from ``RulesetApplied``), never on what it merely trusts or
    claims.  A known equivocation at that serial makes the state ``equivocation``, naming the
    hashes, never plain ``converged``.

    Validation: ``validated`` of a member gathers what the *other* members' signed statuses say of it
    (their latest external probe of it: how many validated it, when last, the holes and blocked ports
    they found); ``alerts_open`` is its own count of open alerts per severity, summed over the live
    members in ``alerts``."""
    validated = _validated_by_target(table)
    pol_hash = trust.policy_hash
    mine = trust.serial
    target_hash = pol_hash[: 2 * HASH_PREFIX] if pol_hash else ""
    e_serial, e_hash, e_rules = enforced
    eq = trust.equivocation
    reported: list[str] = []
    reported_hashes: set[str] = set()
    members = []
    by_region: dict[str, dict[str, int]] = {}
    known = converged = ahead = 0
    alerts = dict.fromkeys(SEVERITIES, 0)
    for rec in sorted(table.records(), key=lambda r: r.node_id):
        m = table.get(rec.node_id)
        assert m is not None
        st = m.status
        is_me = m.node_id == node_id
        if is_me:
            serial: int | None = e_serial
            phash: str | None = e_hash[: 2 * HASH_PREFIX] if e_hash else ""
            rhash: str | None = e_rules.hex()
            trusted: int | None = mine
            eq_hashes = [h[: 2 * HASH_PREFIX] for h in eq.hashes] if eq is not None and eq.serial == mine else []
        else:
            serial = st.serial if st else None
            phash = st.policy_hash.hex() if st else None
            rhash = st.ruleset_hash.hex() if st else None
            trusted = (st.trusted_serial or None) if st else None
            eq_hashes = [h.hex() for h in st.equivocation] if st and st.equivocation_serial == mine else []
        ok = bool(mine) and serial == mine and bool(phash) and phash == target_hash
        counts = _alert_counts(st)
        members.append({
            "node_id": m.node_id, "region": m.region, "address": m.address,
            "liveness": m.liveness, "incarnation": m.incarnation,
            "serial": serial, "policy_hash": phash, "ruleset_hash": rhash,
            "trusted_serial": trusted,
            "state": state if is_me else (st.state if st else None),
            "converged": ok,
            "equivocation": eq_hashes or None,
            "alerts_open": counts,
            "validated": validated.get(m.node_id),
        })
        if m.liveness == LEFT:
            continue
        for sev, n in (counts or {}).items():
            alerts[sev] += n
        reg = by_region.setdefault(m.region, {"members": 0, "known": 0, "converged": 0})
        reg["members"] += 1
        if serial is not None:
            known += 1
            reg["known"] += 1
        if serial is not None and serial > mine:
            ahead += 1  # a claim we could not verify (yet): never "converged"
        if eq_hashes and not is_me:
            reported.append(m.node_id)
            reported_hashes.update(eq_hashes)
        if ok:
            converged += 1
            reg["converged"] += 1
    total = sum(r["members"] for r in by_region.values())
    equivocation = None
    if (eq is not None and eq.serial == mine) or reported:
        own = eq.hashes if eq is not None and eq.serial == mine else ()
        hashes = sorted({h[: 2 * HASH_PREFIX] for h in own} | reported_hashes)
        equivocation = {"serial": mine, "hashes": hashes, "kept": target_hash, "reported_by": reported}
    state = ("equivocation" if equivocation else "converged" if total and converged == total else "converging")
    return {
        "node_id": node_id,
        "region": table.region,
        "address": advertise,
        "incarnation": incarnation,
        "local_health": local_health,
        "policy": {
            "serial": mine, "hash": pol_hash, "state": trust.policy_state(now.wall),
            "root_version": trust.root_version,
            "enforced": {"serial": e_serial, "hash": e_hash or None, "ruleset_hash": e_rules.hex() or None,
                         "state": "enforced" if (e_serial, e_hash) == (mine, pol_hash or "") else
                         ("not_enforced" if not_enforced else "pending")},
            "equivocation": ({"serial": eq.serial, "root_version": eq.root_version, "hashes": list(eq.hashes),
                              "kept": eq.hashes[0]} if eq is not None else None),
        },
        "members": members,
        "liveness": {k: sum(1 for m in members if m["liveness"] == k) for k in (ALIVE, SUSPECT, DEAD, LEFT)},
        "convergence": {
            "state": state, "target_serial": mine, "target_hash": target_hash or None,
            "members": total, "known": known, "converged": converged, "claims_ahead": ahead,
            "fraction": (converged / total) if total else 0.0, "by_region": by_region,
            "equivocation": equivocation,
        },
        "alerts": alerts,
        "validation": {"validated": sum(1 for v in validated.values() if v["target"] in table),
                       "holes": sorted(f"{t} tcp/{h['port']} (seen by {h['by']})"
                                       for t, v in validated.items() if t in table for h in v["holes"])},
        "counters": counters,
    }


def _alert_counts(st: StatusBody | None) -> dict[str, int] | None:
    """A member's open alerts per severity, from its signed status (None: it does not report them)."""
    if st is None or not st.alerts_open:
        return None
    return {sev: (st.alerts_open[i] if i < len(st.alerts_open) else 0) for i, sev in enumerate(SEVERITIES)}


def _validated_by_target(table: MemberTable) -> dict[str, dict[str, Any]]:
    """For every probed member: what the others' signed statuses say of it (see ``status_view``).  One
    pass over the status column (at most ``MAX_VALIDATIONS`` reports per member)."""
    acc: dict[str, list[Any]] = {}  # target -> [by, probers, last_at, checked, holes, blocked]
    recs, codes = table.recs, table.liveness_codes
    for i, info in enumerate(table.statuses):
        if info is None or not info.body.validations or i >= len(recs) or recs[i] is None or codes[i] == LEFT_CODE:
            continue
        prober = info.body.node_id
        for r in info.body.validations:
            if r.target == prober:
                continue  # a member does not validate itself
            a = acc.get(r.target)
            if a is None:
                a = acc[r.target] = [0, [], 0, 0, [], []]
            a[0] += 1
            a[1].append(prober)
            if r.at > a[2]:
                a[2] = r.at
            a[3] += r.checked
            if r.holes:
                a[4] += [(p, prober, r.at) for p in r.holes]
            if r.blocked:
                a[5] += [(p, prober, r.at) for p in r.blocked]
    return {target: {"target": target, "by": a[0], "probers": sorted(a[1]), "last_at": a[2], "checked": a[3],
                     "holes": [{"port": p, "by": b, "at": at} for p, b, at in sorted(a[4])],
                     "blocked": [{"port": p, "by": b, "at": at} for p, b, at in sorted(a[5])]}
            for target, a in acc.items()}
