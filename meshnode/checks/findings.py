"""A check's finding and the difference between two rounds of one check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    """One condition found by a check. ``subject`` is stable for as long as the condition holds (the
    alert's dedup key is built from check + subject); ``kind`` says which condition it is; ``severity``
    is one of critical, error, warning, info; ``details`` are the facts for the alert's custom details."""

    check: str
    subject: str
    kind: str
    severity: str
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FindingChanges:
    """What to tell the alert pipeline after a round: raise ``raised`` (new, or changed severity or
    kind), resolve ``resolved`` (subjects that cleared)."""

    raised: tuple[Finding, ...]
    resolved: tuple[str, ...]


def diff_findings(before: Mapping[str, Finding], after: Mapping[str, Finding]) -> FindingChanges:
    """Subjects that appeared (or whose kind or severity changed) and subjects that cleared, in sorted
    order. A finding whose facts changed but not its kind or severity is not raised again."""
    raised = tuple(
        after[s] for s in sorted(after)
        if s not in before or (before[s].kind, before[s].severity) != (after[s].kind, after[s].severity)
    )
    resolved = tuple(s for s in sorted(before) if s not in after)
    return FindingChanges(raised, resolved)
