"""The daemon's side of the local checks: ``[validate]`` in, changes for the alert pipeline out.

    checks = LocalChecks(cfg.validate, table=cfg.enforce.table, mesh_port=mesh_port)
    deliver(pipeline, PORT_AUDIT, checks.port_audit(enforcer.backend.applied), time.time())  # timer
    argv = checks.bad_handshake(source, reason, ruleset, time.monotonic())                  # mesh listener
    if argv: run it (nft add element ...); the block set drops the source for block_abusers_s
    deliver(pipeline, ABUSE, checks.abuse_round(time.monotonic()), time.time())              # timer
    changes, blocks = checks.port_scan_round(listings, ruleset, time.monotonic())  # nft -j list set dropped_*
    deliver(pipeline, PORT_SCAN, changes, time.time()); run each (source, argv) of blocks

Each round returns only what changed since the previous round of that check (see
:func:`~meshnode.checks.findings.diff_findings`): the pipeline raises an alert when a subject appears and
resolves it when the subject clears, nothing in between.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..config import ValidateSection
from ..enforce.model import Ruleset
from .abuse import CHECK as ABUSE
from .abuse import AbuseDetector, BlockGuard, block_argv
from .findings import Finding, FindingChanges, diff_findings
from .port_scan import CHECK as PORT_SCAN
from .port_scan import PortScanDetector, merge_listings, probe_allowance
from .ports import CHECK as PORT_AUDIT
from .ports import Listener, audit_ports, read_listeners

__all__ = ["ABUSE", "PORT_AUDIT", "PORT_SCAN", "AlertSink", "LocalChecks", "deliver"]  # the check names, for deliver()


class AlertSink(Protocol):
    """The part of :class:`meshnode.alerting.pipeline.AlertPipeline` the checks use."""

    def raise_(self, check: str, subject: str, severity: Any, summary: str, details: dict[str, Any] | None,
               now: float) -> Any: ...

    def resolve(self, check: str, subject: str, now: float) -> Any: ...


def deliver(sink: AlertSink, check: str, changes: FindingChanges, now: float) -> None:
    """Raise the new findings of ``check`` and resolve the cleared ones."""
    for f in changes.raised:
        sink.raise_(f.check, f.subject, f.severity, f.summary, dict(f.details), now)
    for subject in changes.resolved:
        sink.resolve(check, subject, now)


class LocalChecks:
    """Previous findings per check, the abuse detector and the blocking rule of one node."""

    def __init__(self, validate: ValidateSection, *, table: str, mesh_port: int, mesh_udp: bool = False,
                 listeners: Callable[[], Iterable[Listener]] = read_listeners) -> None:
        self._listeners = listeners
        self.table = table
        self.mesh_port = mesh_port
        self.mesh_udp = mesh_udp  # the mesh port's datagram socket ([mesh] datagrams)
        self._ports: dict[str, Finding] = {}
        self._abuse: dict[str, Finding] = {}
        self.validate = validate
        self.detector = AbuseDetector(validate.abuse_threshold, validate.abuse_window_s)
        self.episodes_opened = 0  # abuse episodes opened so far (the daemon raises the finding at once)
        self._scans: dict[str, Finding] = {}
        self.scan_detector = self._scan_detector(validate)
        self._guard_of: tuple[Ruleset, BlockGuard] | None = None
        self.unreadable_elements = 0  # elements of the dropped sets that could not be parsed, so far

    @staticmethod
    def _scan_detector(validate: ValidateSection) -> PortScanDetector | None:
        if not validate.port_scan_ports:
            return None
        return PortScanDetector(validate.port_scan_ports, validate.port_scan_window_s)

    def reconfigure(self, validate: ValidateSection, *, table: str, mesh_port: int, mesh_udp: bool = False) -> None:
        """A reloaded config; the detector starts afresh only when its thresholds changed."""
        if (validate.abuse_threshold, validate.abuse_window_s) != (self.validate.abuse_threshold,
                                                                   self.validate.abuse_window_s):
            self.detector = AbuseDetector(validate.abuse_threshold, validate.abuse_window_s)
        if (validate.port_scan_ports, validate.port_scan_window_s) != (self.validate.port_scan_ports,
                                                                       self.validate.port_scan_window_s):
            self.scan_detector = self._scan_detector(validate)
        self.validate, self.table, self.mesh_port, self.mesh_udp = validate, table, mesh_port, mesh_udp

    def port_audit(self, ruleset: Ruleset | None) -> FindingChanges:
        """One audit of this host's listeners against ``ruleset`` (the one in force) and the declared
        services; the daemon's own mesh port is always declared (its UDP side too, with datagrams on)."""
        expected = [*self.validate.expected_listeners, f"tcp/{self.mesh_port}"]
        if self.mesh_udp:
            expected.append(f"udp/{self.mesh_port}")
        current = audit_ports(self._listeners(), ruleset, expected)
        changes = diff_findings(self._ports, current)
        self._ports = current
        return changes

    def bad_handshake(self, source: str, reason: str, ruleset: Ruleset | None, now: float) -> list[str] | None:
        """Record a failed or refused handshake from ``source``. Returns the ``nft`` command that blocks
        it when this attempt opened an abuse episode, blocking is on, a ruleset with the block sets is in
        force, and the source is neither a member, a break-glass source nor loopback. A source that is
        not an IP address (aiohttp's ``?``) is not counted."""
        try:
            ipaddress.ip_address(source)
        except ValueError:
            return None
        opened = self.detector.record(source, reason, now)
        self.episodes_opened += opened
        return self._block_argv(source, ruleset) if opened else None

    def _guard(self, ruleset: Ruleset) -> BlockGuard:
        """The ruleset's block guard, built once per ruleset (10^4 members: not every round)."""
        if self._guard_of is None or self._guard_of[0] is not ruleset:
            self._guard_of = (ruleset, BlockGuard.from_ruleset(ruleset))
        return self._guard_of[1]

    def _block_argv(self, source: str, ruleset: Ruleset | None) -> list[str] | None:
        seconds = self.validate.block_abusers_s
        if seconds <= 0 or ruleset is None or not any(s.timeout and not s.with_port for s in ruleset.sets):
            return None
        if not self._guard(ruleset).may_block(source):
            return None
        return block_argv(self.table, source, seconds)

    def restore_port_scans(self, open_alerts: Iterable[tuple[str, str]], now: float) -> None:
        """The port-scan alerts still open from the previous run ((subject, summary) pairs): resolved once
        their source has been quiet for a window, not raised again while it goes on."""
        for subject, summary in open_alerts:
            self._scans[subject] = Finding(PORT_SCAN, subject, "port_scan", "warning", summary)
        if self.scan_detector is not None:
            self.scan_detector.adopt(self._scans, now)

    def port_scan_round(self, listings: Iterable[Any], ruleset: Ruleset | None,
                        now: float) -> tuple[FindingChanges, list[tuple[str, list[str]]]]:
        """One reading of the ``dropped_*`` sets (``nft -j list set`` documents): the changed port-scan
        findings, and (source, ``nft`` command) pairs that block the sources whose episode opened now (blocking on,
        block sets in force, and the source neither a member, a break-glass source nor loopback)."""
        if self.scan_detector is None:
            return diff_findings(self._scans, {}), []
        ports, bad = merge_listings(listings)
        self.unreadable_elements += bad
        v = self.validate
        allowance = probe_allowance(v.port_scan_window_s, v.peer_probe_interval_s, v.peer_probe_refused) \
            if v.peer_probes else 0
        members = self._guard(ruleset).members if ruleset is not None else frozenset()
        opened = self.scan_detector.observe(ports, now, members, allowance)
        current = self.scan_detector.findings()
        changes = diff_findings(self._scans, current)
        self._scans = current
        blocks = [(s, argv) for s, argv in ((s, self._block_argv(s, ruleset)) for s in opened) if argv]
        return changes, blocks

    def abuse_round(self, now: float) -> FindingChanges:
        current = self.detector.findings(now)
        changes = diff_findings(self._abuse, current)
        self._abuse = current
        return changes

    def next_abuse_deadline(self) -> float | None:
        return self.detector.next_deadline()
