"""What every enforcement backend does the same way: apply, update sets in place, check and repair drift.

A backend puts a :class:`Ruleset` into the kernel and keeps it there.  Its public surface (blocking
calls: the daemon runs them in a thread executor, one at a time):

* ``apply(ruleset) -> ApplyResult``: make the kernel hold ``ruleset``.  When only set elements changed
  (member certificates), the sets are updated in place; when a few rules changed and the backend can
  edit (nftables, knowing the kernel's rule handles), only those rules and sets change; otherwise the
  whole table/chain is replaced.  Each is one transaction.  On failure it raises
  :class:`EnforcementError` and the previous ruleset stays.
* ``update_sets(ruleset) -> ApplyResult``: the in-place path only (EnforcementError when the rules
  themselves changed).
* ``check_drift(repair=True) -> DriftResult``: read the kernel back, compare its hash with the one read
  right after the last apply, re-apply on drift; no clock inside, the caller's timer decides when.
* ``read_kernel_hash()``, ``applied`` / ``applied_hash``, ``drift_count``, ``remove()``.

:class:`Backend` implements that surface once; a subclass says only how to replace everything
(``_replace``), how to change set elements in place (``_update_in_place``), when it can
(``_in_place_possible``), optionally how to edit only the rules that changed (``_edit_rules``), how to read the kernel back (``read_kernel_hash``) and how to remove its
objects (``_remove_objects``).
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import AddressSet, EnforcementError, Ruleset
from .nft_digest import RulesetDigest, ruleset_digest

COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class EnforcementEvent:
    """Something the daemon should log and alert on; ``name`` is a stable dotted event name."""

    name: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    backend: str
    mode: str  # "full": table/chain replaced; "sets": set elements updated in place; "rules": edited
    hash: str  # ruleset_digest(ruleset).hash of what is now enforced
    kernel_hash: str | None  # what the kernel reads back as (drift baseline); None until read back
    exact: bool  # kernel readback equals the rendered normalised form
    changed_sets: tuple[str, ...] = ()
    verified: bool = True  # False: committed, the read-back is left to the next check_drift()


@dataclass(frozen=True, slots=True)
class DriftResult:
    checked: bool  # False when nothing has been applied yet
    drifted: bool
    expected_hash: str | None
    actual_hash: str | None
    repaired: bool = False
    error: str | None = None
    drift_count: int = 0
    events: tuple[EnforcementEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Readback:
    """What a backend's write left in the kernel: its hash (the drift baseline) and whether it is exactly
    the rendered ruleset."""

    kernel_hash: str | None
    exact: bool = True
    verified: bool = True  # False: loaded (the transaction committed), read back later by check_drift()


SetChanges = list[tuple[AddressSet, AddressSet]]  # (applied, wanted) for every set whose elements changed


class CommandRunner:
    """Runs firewall tools, optionally inside a network namespace (``ip netns exec``)."""

    def __init__(self, netns: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.netns = netns
        self.timeout_s = timeout_s

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def run(self, argv: list[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        full = self.argv(argv)
        try:
            proc = subprocess.run(full, input=stdin, capture_output=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise EnforcementError(f"{full[0]} is not installed (needed for: {' '.join(argv[:2])})") from None
        except subprocess.TimeoutExpired:
            raise EnforcementError(f"{' '.join(argv[:3])} timed out after {self.timeout_s:.0f} s") from None
        if check and proc.returncode != 0:
            raise EnforcementError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {first_lines(proc.stderr)}")
        return proc


def first_lines(data: bytes, n: int = 4) -> str:
    """The first ``n`` lines of a tool's stderr on one line, for an error message."""
    text = data.decode(errors="replace").strip()
    lines = text.splitlines()
    out = " | ".join(line.strip() for line in lines[:n])
    return out + (" ..." if len(lines) > n else "") if out else "(no message)"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Backend:
    """The shared logic: serialised public calls, the choice between in-place and full replacement, the
    bookkeeping of what was applied (ruleset, digest, kernel baseline) and drift detection and repair."""

    name = "abstract"

    def __init__(self, table: str) -> None:
        self.table = table
        self.applied: Ruleset | None = None
        self.drift_count = 0
        self._lock = threading.RLock()
        self._applied_digest: RulesetDigest | None = None
        self._baseline: str | None = None  # kernel hash expected by check_drift
        self._unverified = False  # the last full replacement committed but was not read back yet
        self.temps_removed: list[Path] = []  # stale temp files removed at setup (backends that write files)

    @property
    def applied_hash(self) -> str | None:
        return self._applied_digest.hash if self._applied_digest is not None else None

    # -- public: serialised, so the daemon's apply worker and drift timer never interleave -------------
    def apply(self, ruleset: Ruleset, *, read_back_later: bool = False) -> ApplyResult:
        """Make the kernel hold ``ruleset`` (in place when only set elements changed); EnforcementError
        leaves the previous ruleset in force.

        ``read_back_later``: a full replacement or an edit returns once its transaction committed (the kernel holds
        it) and leaves reading the kernel back to the next :meth:`check_drift`, when the backend allows it
        (nftables, once a read-back proved it prints our rulesets exactly); a mismatch found then is
        drift, alerted and repaired."""
        with self._lock:
            digest = self._checked_digest(ruleset)
            if self._can_update_in_place(digest):
                try:
                    return self._set_elements(ruleset, digest, read_back_later)
                except EnforcementError:
                    pass  # the table was edited or removed behind our back: replace it whole
            else:
                try:
                    readback = self._edit_rules(ruleset, digest, read_back_later)
                except EnforcementError:
                    readback = None  # a rule or set is not where the last read-back saw it: replace all
                if readback is not None:
                    self._record(ruleset, digest, readback)
                    return ApplyResult(self.name, "rules", digest.hash, readback.kernel_hash, readback.exact,
                                       verified=readback.verified)
            return self._replace_all(ruleset, digest, read_back_later)

    def update_sets(self, ruleset: Ruleset) -> ApplyResult:
        """Only the in-place path; EnforcementError if the rules themselves changed."""
        with self._lock:
            digest = self._checked_digest(ruleset)
            if not self._can_update_in_place(digest):
                raise EnforcementError("the rules changed (not only set elements): use apply()")
            return self._set_elements(ruleset, digest)

    def remove(self) -> None:
        """Delete everything this backend created (uninstall; the daemon never calls it on shutdown)."""
        with self._lock:
            self._remove_objects()
            self.applied, self._applied_digest, self._baseline = None, None, None

    def check_drift(self, *, repair: bool = True) -> DriftResult:
        """Read the kernel back; on drift count it, emit events and (by default) re-apply."""
        with self._lock:
            return self._check_drift(repair)

    # -- what each backend says differently -----------------------------------------------------------
    def read_kernel_hash(self) -> str | None:
        """The hash of what the kernel holds of our objects now; None when they do not exist."""
        raise NotImplementedError

    def _in_place_possible(self) -> bool:
        """Whether the last apply left something that set elements can be changed in."""
        raise NotImplementedError

    def _replace(self, ruleset: Ruleset, digest: RulesetDigest) -> Readback:
        """Replace all our objects with ``ruleset`` in one transaction."""
        raise NotImplementedError

    def _update_in_place(self, ruleset: Ruleset, digest: RulesetDigest, changes: SetChanges) -> Readback:
        """Change the elements of the sets in ``changes``; EnforcementError when the kernel then does not
        hold exactly ``ruleset``."""
        raise NotImplementedError

    def _remove_objects(self) -> None:
        raise NotImplementedError

    def _edit_rules(self, ruleset: Ruleset, digest: RulesetDigest, read_back_later: bool) -> Readback | None:
        """Change only the rules and sets that differ from the applied ruleset, in one transaction; None
        when this backend cannot (then nothing was done).  EnforcementError when the kernel refused the
        edit or does not hold ``ruleset`` after it (the caller then replaces everything)."""
        return None

    def _load_only(self, ruleset: Ruleset) -> bool:
        """Replace all our objects without reading the kernel back; False when this backend cannot (then
        nothing was done and :meth:`_replace` runs)."""
        return False

    def _may_read_back_later(self) -> bool:
        """Whether the kernel's listing can be compared with the rendered hash later (see ``_check_drift``)."""
        return False

    # -- shared -----------------------------------------------------------------------------------------
    def _checked_digest(self, ruleset: Ruleset) -> RulesetDigest:
        if ruleset.table != self.table:
            raise EnforcementError(f"ruleset is for table {ruleset.table!r}, this backend manages {self.table!r}")
        applied = self.applied
        if (applied is not None and self._applied_digest is not None and applied.sets == ruleset.sets
                and applied.rules == ruleset.rules):  # the same sets and rules: the same digest, not recomputed
            return self._applied_digest
        return self._digest(ruleset)

    def _digest(self, ruleset: Ruleset) -> RulesetDigest:
        return ruleset_digest(ruleset)

    def _can_update_in_place(self, digest: RulesetDigest) -> bool:
        return (self._applied_digest is not None and self._in_place_possible()
                and digest.structure_hash == self._applied_digest.structure_hash)

    def _replace_all(self, ruleset: Ruleset, digest: RulesetDigest, read_back_later: bool = False) -> ApplyResult:
        if read_back_later and self._load_only(ruleset):
            readback = Readback(None, True, verified=False)
        else:
            readback = self._replace(ruleset, digest)
        self._record(ruleset, digest, readback)
        return ApplyResult(self.name, "full", digest.hash, readback.kernel_hash, readback.exact,
                           verified=readback.verified)

    def _set_elements(self, ruleset: Ruleset, digest: RulesetDigest, read_back_later: bool = False) -> ApplyResult:
        assert self.applied is not None and self._applied_digest is not None
        before = {s.name: s for s in self.applied.sets}
        changes = [(before[s.name], s) for s in ruleset.sets if before[s.name].elements != s.elements]
        if not changes and digest.hash == self._applied_digest.hash == self._baseline and not self._unverified:
            # nothing to load, and the last read-back found exactly this ruleset: the kernel still holds
            # it unless something changed it since, which the drift check (timer, nft monitor) catches
            self._record(ruleset, digest, Readback(self._baseline))
            return ApplyResult(self.name, "sets", digest.hash, self._baseline, True, ())
        if (not changes and read_back_later and digest.hash == self._applied_digest.hash
                and self._may_read_back_later()):
            # nothing to load (e.g. a new policy version that renders the same ruleset here): the kernel
            # holds it since the last load; the next drift check reads it back as after a deferred load
            self._record(ruleset, digest, Readback(None, True, verified=False))
            return ApplyResult(self.name, "sets", digest.hash, None, True, (), verified=False)
        readback = self._update_in_place(ruleset, digest, changes)
        self._record(ruleset, digest, readback)
        return ApplyResult(self.name, "sets", digest.hash, readback.kernel_hash, True,
                           tuple(new.name for _, new in changes))

    def _record(self, ruleset: Ruleset, digest: RulesetDigest, readback: Readback) -> None:
        self.applied, self._applied_digest, self._baseline = ruleset, digest, readback.kernel_hash
        self._unverified = not readback.verified

    @property
    def read_back_pending(self) -> bool:
        """The last full replacement committed and was not read back yet (see ``read_back_later``)."""
        return self._unverified

    def _check_drift(self, repair: bool) -> DriftResult:
        if self.applied is None or self._applied_digest is None:
            return DriftResult(checked=False, drifted=False, expected_hash=None, actual_hash=None,
                               drift_count=self.drift_count)
        # not read back yet: the kernel must hold exactly what was rendered (the backend only defers
        # once a read-back proved that it prints our rulesets exactly)
        expected = self._applied_digest.hash if self._unverified else self._baseline
        try:
            actual = self.read_kernel_hash()
        except EnforcementError as exc:
            actual = f"unreadable: {exc}"
        if actual == expected:
            self._baseline, self._unverified = actual, False
            return DriftResult(checked=True, drifted=False, expected_hash=expected, actual_hash=actual,
                               drift_count=self.drift_count)
        # not read back yet and listed differently: either drift, or this ruleset only prints differently
        # (then the read-back of a fresh load lists what the kernel listed before)
        deferred = self._unverified
        self.drift_count += 1
        facts = {"backend": self.name, "table": self.table, "expected": expected, "actual": actual,
                 "serial": self.applied.policy_serial, "drift_count": self.drift_count}
        events = [EnforcementEvent("enforce.drift_detected", facts)]
        if not repair:
            return DriftResult(True, True, expected, actual, drift_count=self.drift_count, events=tuple(events))
        try:
            result = self._replace_all(self.applied, self._applied_digest)
        except EnforcementError as exc:
            events.append(EnforcementEvent("enforce.drift_repair_failed", {**facts, "error": str(exc)}))
            return DriftResult(True, True, expected, actual, repaired=False, error=str(exc),
                               drift_count=self.drift_count, events=tuple(events))
        if deferred and result.kernel_hash == actual:
            self.drift_count -= 1
            return DriftResult(checked=True, drifted=False, expected_hash=expected, actual_hash=actual,
                               drift_count=self.drift_count)
        events.append(EnforcementEvent("enforce.drift_repaired", {**facts, "kernel_hash": result.kernel_hash}))
        return DriftResult(True, True, expected, actual, repaired=True, drift_count=self.drift_count,
                           events=tuple(events))
