"""Enforcement backends: put a :class:`Ruleset` into the kernel and keep it there.

Every backend has the same small surface (the daemon runs these blocking calls in a thread executor):

* ``apply(ruleset) -> ApplyResult``: make the kernel hold ``ruleset``.  When only set elements changed
  (member certificates), the sets are updated in place; otherwise the whole table/chain is replaced in
  one transaction.  On failure it raises :class:`EnforcementError` and the previous ruleset stays.
* ``update_sets(ruleset) -> ApplyResult``: the in-place path only (EnforcementError when the rules
  themselves changed).
* ``check_drift(repair=True) -> DriftResult``: read the kernel back, compare its normalised hash with
  the expected one, re-apply on drift; no clock inside, the caller's timer decides when.
* ``read_kernel_hash()``, ``applied`` / ``applied_hash``, ``drift_count``, ``remove()``.

Commands run through :class:`CommandRunner`, optionally inside a network namespace (``ip netns exec``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write, remove_stale_temps
from .iptables import IptablesRules, chain_name, ipset_elements, ipset_fill, ipset_prefix
from .model import EnforcementError, RenderOptions, Ruleset
from .nft import FAMILY, canonical_element, normalize, normalized_hash, set_update_json

COMMAND_TIMEOUT_S = 60.0
BACKEND_NAMES = ("nftables", "iptables", "file")


@dataclass(frozen=True, slots=True)
class EnforcementEvent:
    """Something the daemon should log and alert on; ``name`` is a stable dotted event name."""

    name: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    backend: str
    mode: str  # "full": table/chain replaced; "sets": set elements updated in place
    hash: str  # Ruleset.hash of what is now enforced
    kernel_hash: str | None  # what the kernel reads back as (drift baseline)
    exact: bool  # kernel readback equals the rendered normalised form
    changed_sets: tuple[str, ...] = ()


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


class CommandRunner:
    """Runs firewall tools, optionally inside a network namespace."""

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
            raise EnforcementError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {_first_lines(proc.stderr)}")
        return proc


def _first_lines(data: bytes, n: int = 4) -> str:
    text = data.decode(errors="replace").strip()
    lines = text.splitlines()
    out = " | ".join(line.strip() for line in lines[:n])
    return out + (" ..." if len(lines) > n else "") if out else "(no message)"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Backend:
    """Common bookkeeping: the last applied ruleset, the drift baseline and the drift counter."""

    name = "abstract"

    def __init__(self, table: str) -> None:
        self.table = table
        self.applied: Ruleset | None = None
        self.drift_count = 0
        self._lock = threading.RLock()
        self._baseline: str | None = None  # kernel hash expected by check_drift
        self.temps_removed: list[Path] = []  # stale temp files removed at setup (backends that write files)

    @property
    def applied_hash(self) -> str | None:
        return self.applied.hash if self.applied is not None else None

    def _check_table(self, rs: Ruleset) -> None:
        if rs.table != self.table:
            raise EnforcementError(f"ruleset is for table {rs.table!r}, this backend manages {self.table!r}")

    # -- public: serialised, so the daemon's apply worker and drift timer never interleave -------------
    def apply(self, ruleset: Ruleset) -> ApplyResult:
        """Make the kernel hold ``ruleset`` (in place when only set elements changed); EnforcementError
        leaves the previous ruleset in force."""
        with self._lock:
            return self._apply(ruleset)

    def update_sets(self, ruleset: Ruleset) -> ApplyResult:
        """Only the in-place path; EnforcementError if the rules themselves changed."""
        with self._lock:
            return self._update_sets(ruleset)

    def remove(self) -> None:
        """Delete everything this backend created (uninstall; the daemon never calls it on shutdown)."""
        with self._lock:
            self._remove()

    def check_drift(self, *, repair: bool = True) -> DriftResult:
        """Read the kernel back; on drift count it, emit events and (by default) re-apply."""
        with self._lock:
            return self._check_drift(repair)

    # -- to implement ---------------------------------------------------------------------------------
    def _apply(self, ruleset: Ruleset) -> ApplyResult:
        raise NotImplementedError

    def _update_sets(self, ruleset: Ruleset) -> ApplyResult:
        raise NotImplementedError

    def read_kernel_hash(self) -> str | None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError

    def _repair(self, ruleset: Ruleset) -> ApplyResult:
        raise NotImplementedError

    # -- drift --------------------------------------------------------------------------------------
    def _check_drift(self, repair: bool) -> DriftResult:
        if self.applied is None:
            return DriftResult(checked=False, drifted=False, expected_hash=None, actual_hash=None,
                               drift_count=self.drift_count)
        expected = self._baseline
        try:
            actual = self.read_kernel_hash()
        except EnforcementError as exc:
            actual = f"unreadable: {exc}"
        if actual == expected:
            return DriftResult(checked=True, drifted=False, expected_hash=expected, actual_hash=actual,
                               drift_count=self.drift_count)
        self.drift_count += 1
        facts = {"backend": self.name, "table": self.table, "expected": expected, "actual": actual,
                 "serial": self.applied.policy_serial, "drift_count": self.drift_count}
        events = [EnforcementEvent("enforce.drift_detected", facts)]
        if not repair:
            return DriftResult(True, True, expected, actual, drift_count=self.drift_count, events=tuple(events))
        try:
            result = self._repair(self.applied)
        except EnforcementError as exc:
            events.append(EnforcementEvent("enforce.drift_repair_failed", {**facts, "error": str(exc)}))
            return DriftResult(True, True, expected, actual, repaired=False, error=str(exc),
                               drift_count=self.drift_count, events=tuple(events))
        events.append(EnforcementEvent("enforce.drift_repaired", {**facts, "kernel_hash": result.kernel_hash}))
        return DriftResult(True, True, expected, actual, repaired=True, drift_count=self.drift_count,
                           events=tuple(events))


def _changed_sets(old: Ruleset, new: Ruleset) -> list[Any]:
    before = {s.name: s.elements for s in old.sets}
    return [s for s in new.sets if before.get(s.name) != s.elements]


def _set_pairs(old: Ruleset, new: Ruleset) -> list[tuple[Any, Any]]:
    before = {s.name: s for s in old.sets}
    return [(before[s.name], s) for s in new.sets if before[s.name].elements != s.elements]


# -- nftables ----------------------------------------------------------------------------------------
class NftBackend(Backend):
    """``table inet <table>``, replaced atomically with ``nft -j -f -``; sets updated in place.

    With an nft built without JSON support it falls back to the text form (``nft -f -``) and compares
    the kernel's text listing with the one read right after applying (no in-place set updates then)."""

    name = "nftables"

    def __init__(self, table: str, *, netns: str | None = None, nft: str = "nft") -> None:
        super().__init__(table)
        self.runner = CommandRunner(netns)
        self.nft = nft
        self.exact = True  # False if this nft prints our ruleset differently from how we render it
        self._json: bool | None = None  # probed on first use

    def json_supported(self) -> bool:
        if self._json is None:
            proc = self.runner.run([self.nft, "-j", "list", "tables"], check=False)
            self._json = not (proc.returncode != 0 and b"JSON" in proc.stderr)
        return self._json

    def _load(self, doc: dict[str, Any]) -> None:
        self.runner.run([self.nft, "-j", "-f", "-"], stdin=json.dumps(doc).encode())

    def _list(self, as_json: bool) -> bytes | None:
        argv = [self.nft, *(["-j"] if as_json else []), "list", "table", FAMILY, self.table]
        proc = self.runner.run(argv, check=False)
        if proc.returncode != 0:
            if b"No such file or directory" in proc.stderr:
                return None
            raise EnforcementError(f"nft list table {FAMILY} {self.table} failed: {_first_lines(proc.stderr)}")
        return proc.stdout

    def read_kernel(self) -> dict[str, Any] | None:
        """The kernel's JSON listing of our table, or None when the table does not exist."""
        out = self._list(as_json=True)
        return None if out is None else json.loads(out)

    def read_kernel_hash(self) -> str | None:
        if not self.json_supported():
            out = self._list(as_json=False)
            return None if out is None else _sha(out)
        doc = self.read_kernel()
        return None if doc is None else normalized_hash(normalize(doc))

    def _full(self, rs: Ruleset) -> ApplyResult:
        if self.json_supported():
            self._load(rs.to_nft_json())
        else:
            self.runner.run([self.nft, "-f", "-"], stdin=rs.to_nft().encode())
        kernel = self.read_kernel_hash()
        self.exact = kernel == rs.hash
        self.applied, self._baseline = rs, kernel
        return ApplyResult(self.name, "full", rs.hash, kernel, self.exact)

    def _sets(self, rs: Ruleset) -> ApplyResult:
        assert self.applied is not None
        pairs = _set_pairs(self.applied, rs)
        if pairs:
            self._load(set_update_json(self.table, pairs))
        kernel = self.read_kernel_hash()
        if kernel != rs.hash:
            raise EnforcementError(f"after the set update the kernel holds {kernel}, not {rs.hash}")
        self.applied, self._baseline = rs, kernel
        return ApplyResult(self.name, "sets", rs.hash, kernel, True, tuple(new.name for _, new in pairs))

    def _can_update_sets(self, rs: Ruleset) -> bool:
        return self.applied is not None and self.exact and rs.structure_hash == self.applied.structure_hash

    def _apply(self, ruleset: Ruleset) -> ApplyResult:
        self._check_table(ruleset)
        if self._can_update_sets(ruleset):
            try:
                return self._sets(ruleset)
            except EnforcementError:
                pass  # the table was edited or removed behind our back: replace it whole
        return self._full(ruleset)

    def _update_sets(self, ruleset: Ruleset) -> ApplyResult:
        self._check_table(ruleset)
        if not self._can_update_sets(ruleset):
            raise EnforcementError("the rules changed (not only set elements): use apply()")
        return self._sets(ruleset)

    def _repair(self, ruleset: Ruleset) -> ApplyResult:
        return self._full(ruleset)

    def _remove(self) -> None:
        self.runner.run([self.nft, "-f", "-"], stdin=f"table {FAMILY} {self.table} {{}}\ndelete table {FAMILY} {self.table}\n".encode())
        self.applied, self._baseline = None, None


# -- iptables ----------------------------------------------------------------------------------------
_MATCH_SET_RE = re.compile(r"--match-set (\S+) ")


class IptablesBackend(Backend):
    """ipset + ``<table>-input`` chains (IPv4 and IPv6) hooked from INPUT by one jump each."""

    name = "iptables"

    def __init__(self, table: str, *, netns: str | None = None, iptables: str = "iptables", ipset: str = "ipset") -> None:
        super().__init__(table)
        self.runner = CommandRunner(netns)
        self.chain = chain_name(table)
        self.tools = {
            "ip": iptables,
            "ip6": iptables.replace("iptables", "ip6tables"),
        }
        self.ipset = ipset
        self.generation: str | None = None

    # -- reading --------------------------------------------------------------------------------------
    def _save(self, fam: str) -> list[str]:
        proc = self.runner.run([f"{self.tools[fam]}-save", "-t", "filter"])
        return proc.stdout.decode().splitlines()

    def _chain_state(self, fam: str) -> dict[str, Any]:
        lines = self._save(fam)
        declared = any(line.startswith(f":{self.chain} ") for line in lines)
        rules = [line for line in lines if line.startswith(f"-A {self.chain} ")]
        input_rules = [line for line in lines if line.startswith("-A INPUT ")]
        jumps = [i for i, line in enumerate(input_rules) if line == f"-A INPUT -j {self.chain}"]
        return {"declared": declared, "rules": rules, "hooked_first": jumps == [0]}

    def _our_sets(self) -> dict[str, dict[str, Any]]:
        proc = self.runner.run([self.ipset, "save"])
        sets: dict[str, dict[str, Any]] = {}
        prefix = f"{self.table}-"
        for line in proc.stdout.decode().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "create" and parts[1].startswith(prefix):
                sets[parts[1]] = {"type": parts[2], "family": parts[parts.index("family") + 1], "elem": []}
            elif len(parts) >= 3 and parts[0] == "add" and parts[1] in sets:
                sets[parts[1]]["elem"].append(parts[2])
        for s in sets.values():
            s["elem"].sort()
        return sets

    def read_kernel_state(self) -> dict[str, Any]:
        return {"ip": self._chain_state("ip"), "ip6": self._chain_state("ip6"), "sets": self._our_sets()}

    def read_kernel_hash(self) -> str | None:
        return self._state_hash(self.read_kernel_state())

    @staticmethod
    def _state_hash(state: dict[str, Any]) -> str | None:
        if not state["ip"]["declared"] and not state["ip6"]["declared"]:
            return None
        return _sha(json.dumps(state, sort_keys=True).encode())

    def _current_generation(self) -> str | None:
        if self.generation is not None:
            return self.generation
        for line in self._save("ip"):
            if line.startswith(f"-A {self.chain} "):
                m = _MATCH_SET_RE.search(line)
                if m and m.group(1).startswith(f"{self.table}-"):
                    return m.group(1)[len(self.table) + 1]
        return None

    # -- writing --------------------------------------------------------------------------------------
    def _destroy_sets(self, names: list[str]) -> None:
        for name in names:
            self.runner.run([self.ipset, "destroy", name], check=False)

    def _hook(self, fam: str) -> None:
        tool = self.tools[fam]
        proc = self.runner.run([tool, "-S", "INPUT"])
        rules = [line for line in proc.stdout.decode().splitlines() if line.startswith("-A INPUT")]
        jump = f"-A INPUT -j {self.chain}"
        positions = [i + 1 for i, line in enumerate(rules) if line == jump]
        if positions == [1]:
            return
        self.runner.run([tool, "-I", "INPUT", "1", "-j", self.chain])
        for pos in sorted((p + 1 for p in positions), reverse=True):  # old ones moved down by one
            self.runner.run([tool, "-D", "INPUT", str(pos)])

    def _restore_chain(self, fam: str, text: str) -> None:
        self.runner.run([f"{self.tools[fam]}-restore", "--noflush"], stdin=text.encode())

    def _full(self, rs: Ruleset) -> ApplyResult:
        old = self._current_generation()
        new = "b" if old == "a" else "a"
        rendering: IptablesRules = rs.to_iptables(new)
        leftovers = [n for n in self._our_sets() if n.startswith(ipset_prefix(self.table, new))]
        self._destroy_sets(leftovers)
        created = list(rendering.set_names.values())
        try:
            self.runner.run([self.ipset, "restore"], stdin=rendering.ipset.encode())
        except EnforcementError:
            self._destroy_sets(created)
            raise
        previous_v4 = self._chain_state("ip")
        try:
            self._restore_chain("ip", rendering.ipv4)
        except EnforcementError:
            self._destroy_sets(created)
            raise
        try:
            self._restore_chain("ip6", rendering.ipv6)
        except EnforcementError:
            self._rollback_v4(previous_v4)
            self._destroy_sets(created)
            raise
        self._hook("ip")
        self._hook("ip6")
        if old is not None:
            self._destroy_sets([n for n in self._our_sets() if n.startswith(ipset_prefix(self.table, old))])
        self.generation = new
        state = self.read_kernel_state()
        kernel = self._state_hash(state)
        self.applied, self._baseline = rs, kernel
        return ApplyResult(self.name, "full", rs.hash, kernel, self._sets_exact(rs, new, state["sets"]))

    def _rollback_v4(self, previous: dict[str, Any]) -> None:
        if previous["declared"]:
            text = "\n".join(["*filter", f":{self.chain} - [0:0]", *previous["rules"], "COMMIT", ""])
            self.runner.run([f"{self.tools['ip']}-restore", "--noflush"], stdin=text.encode(), check=False)
        else:
            self.runner.run([self.tools["ip"], "-F", self.chain], check=False)
            self.runner.run([self.tools["ip"], "-X", self.chain], check=False)

    @staticmethod
    def _sets_exact(rs: Ruleset, generation: str, kernel_sets: dict[str, dict[str, Any]]) -> bool:
        """The kernel's ipsets hold exactly the rendered elements."""
        for logical, name in rs.to_iptables(generation).set_names.items():
            want = {canonical_element(e) for e in ipset_elements(rs.set_by_name(logical))}
            got = {canonical_element(e) for e in kernel_sets.get(name, {}).get("elem", [])}
            if want != got:
                return False
        return True

    def _sets(self, rs: Ruleset) -> ApplyResult:
        assert self.applied is not None and self.generation is not None
        if self.read_kernel_hash() != self._baseline:
            raise EnforcementError("the chain or sets were edited behind our back")
        changed = _changed_sets(self.applied, rs)
        rendering = rs.to_iptables(self.generation)
        lines: list[str] = []
        tmp_names = []
        for s in changed:
            name = rendering.set_names[s.name]
            tmp = f"{name}-t"  # at most 29 characters: ipset allows 31
            tmp_names.append(tmp)
            lines += ipset_fill(tmp, s)
            lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
        if lines:
            try:
                self.runner.run([self.ipset, "restore"], stdin=("\n".join(lines) + "\n").encode())
            except EnforcementError:
                self._destroy_sets(tmp_names)  # swaps are atomic per set; the rest stays as it was
                raise
        state = self.read_kernel_state()
        if not self._sets_exact(rs, self.generation, state["sets"]):
            raise EnforcementError("after the set update the kernel's sets differ from the rendered ones")
        kernel = self._state_hash(state)
        self.applied, self._baseline = rs, kernel
        return ApplyResult(self.name, "sets", rs.hash, kernel, True, tuple(s.name for s in changed))

    def _can_update_sets(self, rs: Ruleset) -> bool:
        return (self.applied is not None and self.generation is not None
                and rs.structure_hash == self.applied.structure_hash)

    def _apply(self, ruleset: Ruleset) -> ApplyResult:
        self._check_table(ruleset)
        if self._can_update_sets(ruleset):
            try:
                return self._sets(ruleset)
            except EnforcementError:
                pass
        return self._full(ruleset)

    def _update_sets(self, ruleset: Ruleset) -> ApplyResult:
        self._check_table(ruleset)
        if not self._can_update_sets(ruleset):
            raise EnforcementError("the rules changed (not only set elements): use apply()")
        return self._sets(ruleset)

    def _repair(self, ruleset: Ruleset) -> ApplyResult:
        return self._full(ruleset)

    def _remove(self) -> None:
        for fam, tool in self.tools.items():
            state = self._chain_state(fam)
            while True:
                if self.runner.run([tool, "-D", "INPUT", "-j", self.chain], check=False).returncode != 0:
                    break
            if state["declared"]:
                self.runner.run([tool, "-F", self.chain], check=False)
                self.runner.run([tool, "-X", self.chain], check=False)
        self._destroy_sets(list(self._our_sets()))
        self.applied, self._baseline, self.generation = None, None, None


# -- file --------------------------------------------------------------------------------------------
class FileBackend(Backend):
    """Writes the rendered ruleset to a file and enforces nothing (override ``allow_file_backend``)."""

    name = "file"

    def __init__(self, table: str, path: Path, fmt: str = "nft") -> None:
        super().__init__(table)
        if fmt not in ("nft", "json"):
            raise EnforcementError(f"file backend format {fmt!r}: nft or json")
        self.path = Path(path)
        self.fmt = fmt
        # A write killed mid-way leaves `.<file>.tmp.<pid>`: remove those of our file before writing.
        self.temps_removed = remove_stale_temps(self.path.parent, lambda name: name == self.path.name)

    def _text(self, rs: Ruleset) -> bytes:
        if self.fmt == "json":
            return (json.dumps(rs.to_nft_json(), indent=2) + "\n").encode()
        return rs.to_nft().encode()

    def _apply(self, ruleset: Ruleset) -> ApplyResult:
        self._check_table(ruleset)
        data = self._text(ruleset)
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            raise EnforcementError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.applied, self._baseline = ruleset, _sha(data)
        return ApplyResult(self.name, "full", ruleset.hash, self._baseline, True)

    def _update_sets(self, ruleset: Ruleset) -> ApplyResult:
        return self._apply(ruleset)

    def read_kernel_hash(self) -> str | None:
        try:
            return _sha(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EnforcementError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _repair(self, ruleset: Ruleset) -> ApplyResult:
        return self._apply(ruleset)

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.applied, self._baseline = None, None


def make_backend(
    name: str,
    options: RenderOptions,
    *,
    file_path: Path | str | None = None,
    allow_file_backend: bool = False,
    netns: str | None = None,
    file_format: str = "nft",
) -> Backend:
    """``name`` is nftables (default), iptables, or file (only with the override allow_file_backend)."""
    if name in ("nftables", "nft"):
        return NftBackend(options.table, netns=netns)
    if name == "iptables":
        return IptablesBackend(options.table, netns=netns)
    if name == "file":
        if not allow_file_backend:
            raise EnforcementError(
                "the file backend enforces nothing; it is allowed only with the explicit override "
                "[overrides] allow_file_backend = true"
            )
        if file_path is None:
            raise EnforcementError("the file backend needs a file path (enforce.file)")
        return FileBackend(options.table, Path(file_path), file_format)
    raise EnforcementError(f"unknown enforcement backend {name!r}: one of {', '.join(BACKEND_NAMES)}")


def missing_tools(name: str) -> list[str]:
    """The missing executables for a backend (empty when it can run here)."""
    need = {"nftables": ["nft"], "iptables": ["iptables-restore", "ip6tables-restore", "iptables-save", "ipset"],
            "file": []}.get(name, [])
    return [t for t in need if shutil.which(t) is None]
