"""Local checks: what each node validates about itself, as pure functions and small state machines.

Every check returns the *current* set of findings keyed by a stable subject (``tcp/8080``, a source
address); the daemon diffs consecutive sets with :func:`diff_findings` and raises an alert for each
subject that appeared and resolves each one that cleared (one alert per episode, nothing in between).

    findings.py   the Finding value and the diff between two rounds
    ports.py      listening sockets (/proc/net) against the enforced ruleset and [validate] expected_listeners
    abuse.py      per-source failed / rate-limited handshakes over a window; the optional timeout block set
    port_scan.py  sources with many distinct dropped ports, read from the nftables dropped_v4/v6 sets
    local.py      the daemon's side: [validate] in, per-round changes out, delivered to the alert pipeline
"""

from .findings import Finding, FindingChanges, diff_findings

__all__ = ["Finding", "FindingChanges", "diff_findings"]
