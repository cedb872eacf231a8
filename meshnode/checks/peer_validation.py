"""External validation, the prober's findings: one alert per episode per (target, port), the reports that go
into this node's signed status. Pure: results in, changes out.

    pv = PeerValidation()
    changes = pv.record(result)          # {HOLE_CHECK: FindingChanges, BLOCKED_CHECK: FindingChanges}
    deliver(pipeline, check, changes[check], now) for each check
    plan_round(..., held=pv.held())      # ports with an open finding are re-probed until they clear
    core.feed(ValidationReported(pv.reports(), counts))

Findings (subject ``<target>/tcp/<port>``):

* ``enforcement_hole`` (critical): a port the signed policy refuses to this node accepted its connection.
  Cleared by a later probe of that port that is not accepted, or that the policy now allows.
* ``peer_blocked`` (warning): a port the policy opens to this node was dropped while the target's mesh
  port answered. Cleared by a later probe that gets through (or a RST: nothing listening, but not dropped).

A probe whose outcome says nothing (``unknown``: our side failed, or the host did not answer at all)
leaves the port's finding as it was. A target that stops being a member (revoked, certificate expired)
takes its findings with it (:meth:`forget`: resolved) and its report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from protocol.gossip.wire import MAX_REPORT_PORTS, MAX_VALIDATIONS, ProbeReport

from .findings import Finding, FindingChanges, diff_findings
from .peer_probe import ProbeResult
from .probe_plan import BLOCKED, HOLE, MESH, NO_LISTENER, OK, OPEN, REFUSED, UNKNOWN, judge

HOLE_CHECK = "enforcement_hole"
BLOCKED_CHECK = "peer_blocked"
CHECKS = (HOLE_CHECK, BLOCKED_CHECK)


def subject_of(target: str, port: int) -> str:
    return f"{target}/tcp/{port}"


def parse_subject(subject: str) -> tuple[str, int] | None:
    target, _, rest = subject.partition("/tcp/")
    return (target, int(rest)) if target and rest.isdigit() else None


class PeerValidation:
    """Open findings per check, and the latest report per target (newest first, at most ``max_reports``)."""

    def __init__(self, max_reports: int = MAX_VALIDATIONS) -> None:
        self._open: dict[str, dict[str, Finding]] = {c: {} for c in CHECKS}
        self._reports: OrderedDict[str, ProbeReport] = OrderedDict()
        self._max_reports = max_reports
        self.last_verdicts: dict[str, int] = {}  # the ports of the latest record(), by verdict (for metrics)

    def restore(self, check: str, subject: str, summary: str) -> None:
        """A finding still open from the previous run (the alert pipeline restored it): held, so the next
        probe of that target re-checks the port and resolves it when it cleared."""
        parsed = parse_subject(subject)
        if check in self._open and parsed is not None:
            self._open[check][subject] = Finding(check, subject, _KIND[check], _SEVERITY[check], summary,
                                                 {"target": parsed[0], "port": parsed[1]})

    def held(self) -> dict[str, set[int]]:
        """node id -> ports with an open finding (to probe again)."""
        out: dict[str, set[int]] = {}
        for findings in self._open.values():
            for subject in findings:
                parsed = parse_subject(subject)
                if parsed is not None:
                    out.setdefault(parsed[0], set()).add(parsed[1])
        return out

    def record(self, result: ProbeResult) -> dict[str, FindingChanges]:
        """Judge one probe and return, per check, what to raise and resolve."""
        mesh_open = any(p.expect == MESH and p.outcome == OPEN for p in result.ports)
        after = {c: dict(f) for c, f in self._open.items()}
        checked = 0
        self.last_verdicts = {}
        for p in result.ports:
            verdict = judge(p.expect, p.outcome, mesh_open)
            self.last_verdicts[verdict] = self.last_verdicts.get(verdict, 0) + 1
            subject = subject_of(result.target, p.port)
            if verdict == UNKNOWN:
                continue
            checked += verdict in (OK, NO_LISTENER)
            after[HOLE_CHECK].pop(subject, None)
            after[BLOCKED_CHECK].pop(subject, None)
            if verdict == HOLE:
                after[HOLE_CHECK][subject] = Finding(
                    HOLE_CHECK, subject, HOLE, "critical",
                    f"enforcement hole on {result.target}: tcp/{p.port} accepted a connection from {result.source}"
                    " although the signed policy refuses it",
                    {"target": result.target, "host": result.host, "port": p.port, "source": result.source,
                     "expected": REFUSED, "outcome": p.outcome})
            elif verdict == BLOCKED:
                after[BLOCKED_CHECK][subject] = Finding(
                    BLOCKED_CHECK, subject, BLOCKED, "warning",
                    f"tcp/{p.port} on {result.target} is dropped for {result.source} although the signed policy "
                    "opens it (its mesh port answered)",
                    {"target": result.target, "host": result.host, "port": p.port, "source": result.source,
                     "expected": p.expect, "outcome": p.outcome})
        changes = {c: diff_findings(self._open[c], after[c]) for c in CHECKS}
        self._open = after
        self._reports.pop(result.target, None)
        self._reports[result.target] = ProbeReport(result.target, max(0, int(result.at)), checked,
                                                   self._ports(HOLE_CHECK, result.target),
                                                   self._ports(BLOCKED_CHECK, result.target))
        while len(self._reports) > self._max_reports:
            self._reports.popitem(last=False)
        return changes

    def forget(self, members: Iterable[str]) -> dict[str, FindingChanges]:
        """Drop the findings and reports of targets that are no longer in ``members``."""
        keep = set(members)
        after = {c: {s: f for s, f in found.items() if (parse_subject(s) or ("", 0))[0] in keep}
                 for c, found in self._open.items()}
        changes = {c: diff_findings(self._open[c], after[c]) for c in CHECKS}
        self._open = after
        for target in [t for t in self._reports if t not in keep]:
            del self._reports[target]
        return changes

    def reports(self) -> tuple[ProbeReport, ...]:
        """The latest report per target, newest first (for the signed status)."""
        return tuple(reversed(self._reports.values()))

    def _ports(self, check: str, target: str) -> tuple[int, ...]:
        ports = sorted(p for p in (parse_subject(s) for s in self._open[check]) if p is not None and p[0] == target)
        return tuple(port for _t, port in ports)[:MAX_REPORT_PORTS]


_SEVERITY: Mapping[str, str] = {HOLE_CHECK: "critical", BLOCKED_CHECK: "warning"}
_KIND: Mapping[str, str] = {HOLE_CHECK: HOLE, BLOCKED_CHECK: BLOCKED}
