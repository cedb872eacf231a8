"""Unreachable members and regions: one alert when a member has been unreachable for longer than a
threshold, one alert (instead of one per member) when every other member of a region has. Pure: the
member view in, findings out; one clock throughout (the daemon uses ``time.monotonic()``).

    reach = Reachability(after_s=120)
    changes = reach.round([("n2", "eu", "dead"), ("n3", "us", "alive")], me="n1", now=time.monotonic())
    # {PEER_CHECK: FindingChanges(...), REGION_CHECK: FindingChanges(...)}

A member is unreachable while SWIM holds it ``suspect`` or ``dead``: SWIM's direct and indirect probes
(through other members, over authenticated channels) are the connection check, so "suspect" already means
neither we nor the helpers we asked got an answer. ``left`` members said goodbye and are not counted.

* ``peer_unreachable`` (warning), subject the node id: unreachable for ``after_s`` or longer; resolved when
  it answers again (alive), leaves, or stops being a member.
* ``region_unreachable`` (error), subject the region: every member of a region other than our own (at least
  two) unreachable for ``after_s``; its members get no alerts of their own while it holds.
"""

from __future__ import annotations

from collections.abc import Iterable

from .findings import Finding, FindingChanges, diff_findings

PEER_CHECK = "peer_unreachable"
REGION_CHECK = "region_unreachable"
CHECKS = (PEER_CHECK, REGION_CHECK)
UNREACHABLE = frozenset({"suspect", "dead"})
REGION_MIN_MEMBERS = 2


class Reachability:
    def __init__(self, after_s: float) -> None:
        if after_s <= 0:
            raise ValueError("after_s must be positive")
        self.after_s = after_s
        self._since: dict[str, float] = {}  # node id -> when we first saw it unreachable (this episode)
        self._open: dict[str, dict[str, Finding]] = {c: {} for c in CHECKS}

    def restore(self, check: str, subject: str, summary: str) -> None:
        """A finding still open from the previous run: resolved by the first round that does not find it."""
        if check in self._open:
            self._open[check][subject] = Finding(check, subject, check, _SEVERITY[check], summary, {})

    def round(self, members: Iterable[tuple[str, str, str]], *, me: str, now: float) -> dict[str, FindingChanges]:
        """``members``: (node id, region, liveness) of every member this node knows (itself included)."""
        by_region: dict[str, list[str]] = {}
        long_down: dict[str, float] = {}
        my_region = ""
        present: set[str] = set()
        for node_id, region, liveness in members:
            if node_id == me:
                my_region = region
                continue
            if liveness == "left":
                continue
            present.add(node_id)
            by_region.setdefault(region, []).append(node_id)
            if liveness not in UNREACHABLE:
                self._since.pop(node_id, None)
                continue
            since = self._since.setdefault(node_id, now)
            if now - since >= self.after_s:
                long_down[node_id] = now - since
        for node_id in [n for n in self._since if n not in present]:
            del self._since[node_id]
        found: dict[str, dict[str, Finding]] = {c: {} for c in CHECKS}
        for region, ids in sorted(by_region.items()):
            if region != my_region and len(ids) >= REGION_MIN_MEMBERS and all(n in long_down for n in ids):
                worst = max(long_down[n] for n in ids)
                found[REGION_CHECK][region] = Finding(
                    REGION_CHECK, region, REGION_CHECK, "error",
                    f"region {region} unreachable: all {len(ids)} members suspect or dead for {worst:.0f} s or more",
                    {"region": region, "members": sorted(ids), "unreachable_s": round(worst)})
                continue
            for node_id in ids:
                if node_id in long_down:
                    found[PEER_CHECK][node_id] = Finding(
                        PEER_CHECK, node_id, PEER_CHECK, "warning",
                        f"member {node_id} (region {region}) unreachable for {long_down[node_id]:.0f} s",
                        {"member": node_id, "region": region, "unreachable_s": round(long_down[node_id])})
        changes = {c: diff_findings(self._open[c], found[c]) for c in CHECKS}
        self._open = found
        return changes


_SEVERITY = {PEER_CHECK: "warning", REGION_CHECK: "error"}
