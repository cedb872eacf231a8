"""Durable node state: trusted roots and the last-known-good policy, as exact signed bytes.

Layout under ``data_dir``::

    roots/root.<version>.msgpack   every trusted root after the pinned anchor
    policy/<serial>.msgpack        the newest accepted policies (the last KEEP_POLICIES)
    directory.msgpack (+ .bak)     the member file: [{node_id, address, region, cert}] (the core's
                                   ``PersistMembers``), for restarts without seeds, and so a reboot
                                   enforces full sets

Earlier versions kept the directory in two files, ``peers.msgpack`` and ``members.msgpack``: they are
read (once) when ``directory.msgpack`` does not exist yet, and removed once it is written.

Every file is written atomically; the member file also keeps the copy it replaced (``.bak``).
On load everything is re-verified through TrustedState; a corrupt, truncated, over-size or
unverifiable file is reported (returned in ``LoadReport.problems``, which the daemon logs as
``state.problem`` and counts) and skipped: it never replaces good state, the newest policy that
verifies wins, and a damaged directory file falls back to its previous copy.  Temp files that a killed
write left behind are removed when the state is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from protocol.errors import ExpiredError, MeshError, TrustError
from protocol.gossip import MemberEntry
from protocol.trust import MAX_ENVELOPE_BYTES, TrustedState

from .fsutil import atomic_write, backup_path, remove_stale_temps

KEEP_POLICIES = 3
# roots/ and policy/ hold one signed envelope each.
MAX_STATE_FILE_BYTES = MAX_ENVELOPE_BYTES
# The member file holds (node id, address, region, certificate) per member.  Measured bytes per member:
# 450 with a typical certificate (2 roles, 2 addresses); 1,308 with the largest we call legitimate
# (64-character id and region, 8 roles of 64 characters, 4 IPv6 addresses).
DIRECTORY_MEMBERS = 100_000  # what must survive a reboot
DIRECTORY_BYTES_PER_MEMBER = 2 << 10  # 1.5x the largest entry measured, 4.5x a typical one
MAX_DIRECTORY_FILE_BYTES = DIRECTORY_MEMBERS * DIRECTORY_BYTES_PER_MEMBER  # 204,800,000 B (~195 MiB)
_ROOT_RE = re.compile(r"\Aroot\.([0-9]{1,20})\.msgpack\Z")
_POLICY_RE = re.compile(r"\A([0-9]{1,20})\.msgpack\Z")


class StateFileError(MeshError):
    """A state file that cannot be used: over its size limit, or not what we wrote."""


@dataclass
class LoadReport:
    roots_loaded: int = 0
    policy_serial: int = 0
    members_loaded: int = 0
    temps_removed: int = 0
    problems: list[str] = field(default_factory=list)


def _owned_temp(name: str) -> bool:
    """Targets of our own writes: the only temp files the store removes."""
    return name.endswith((".msgpack", ".msgpack.bak"))


def _decode_members(data: bytes) -> list[MemberEntry]:
    return msgspec.msgpack.decode(data, type=list[MemberEntry])


def _decode_legacy_members(data: bytes) -> dict[str, bytes]:
    return msgspec.msgpack.decode(data, type=dict[str, bytes])


def _decode_legacy_peers(data: bytes) -> list[dict[str, Any]]:
    return msgspec.msgpack.decode(data, type=list[dict[str, Any]])


class StateStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.roots_dir = self.dir / "roots"
        self.policy_dir = self.dir / "policy"
        self.members_path = self.dir / "directory.msgpack"
        self.legacy_paths = (self.dir / "peers.msgpack", self.dir / "members.msgpack")  # read for upgrade
        # What load_into read of the member file, handed over once by load_members.
        self._handover: list[MemberEntry] | None = None

    def ensure(self) -> None:
        for d in (self.dir, self.roots_dir, self.policy_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- writes -------------------------------------------------------------------------------------
    def save_root(self, version: int, data: bytes) -> None:
        self.ensure()
        atomic_write(self.roots_dir / f"root.{version}.msgpack", data)

    def save_policy(self, serial: int, data: bytes) -> None:
        self.ensure()
        atomic_write(self.policy_dir / f"{serial}.msgpack", data)
        serials = sorted(self._policy_serials(), reverse=True)
        for old in serials[KEEP_POLICIES:]:
            (self.policy_dir / f"{old}.msgpack").unlink(missing_ok=True)

    def save_members(self, entries: Sequence[MemberEntry]) -> None:
        """The member file (certificates as exact signed bytes); the two files it replaces go."""
        self.ensure()
        atomic_write(self.members_path, msgspec.msgpack.encode(list(entries)), keep_previous=True)
        for legacy in self.legacy_paths:
            legacy.unlink(missing_ok=True)
            backup_path(legacy).unlink(missing_ok=True)

    def remove_stale_temps(self) -> list[Path]:
        """Temp files of writes that a kill interrupted (see fsutil.remove_stale_temps)."""
        removed: list[Path] = []
        for d in (self.dir, self.roots_dir, self.policy_dir):
            removed += remove_stale_temps(d, _owned_temp)
        return removed

    # -- reads --------------------------------------------------------------------------------------
    def _policy_serials(self) -> list[int]:
        if not self.policy_dir.is_dir():
            return []
        return [int(m.group(1)) for p in self.policy_dir.iterdir() if (m := _POLICY_RE.match(p.name))]

    def _read(self, path: Path, limit: int = MAX_STATE_FILE_BYTES) -> bytes:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StateFileError(f"{path}: larger than its limit of {limit} bytes")
        return data

    def _load_directory_file(self, path: Path, decode: Any, report: LoadReport) -> tuple[bytes, Any] | None:
        """The newest good copy of a directory file (``path``, else its ``.bak``), as (bytes, decoded).
        Anything unusable is one problem in ``report``: never a silent empty."""
        trouble: list[str] = []
        for candidate in (path, backup_path(path)):
            try:
                data = self._read(candidate, MAX_DIRECTORY_FILE_BYTES)
                value = decode(data)
            except FileNotFoundError:
                if candidate == path and backup_path(path).exists():
                    trouble.append(f"{path}: missing")
                continue
            except StateFileError as exc:
                trouble.append(str(exc))
                continue
            except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                trouble.append(f"{candidate}: unreadable: {exc}")
                continue
            if trouble:
                report.problems.append(f"{'; '.join(trouble)}; loaded the previous copy {candidate} "
                                       f"({len(value)} entries)")
            return data, value
        if trouble:
            report.problems.append(f"{'; '.join(trouble)}; no usable copy: starting without it")
        return None

    def _read_members(self, report: LoadReport) -> list[MemberEntry]:
        if not self.members_path.exists() and not backup_path(self.members_path).exists():
            return self._read_legacy_members(report)
        got = self._load_directory_file(self.members_path, _decode_members, report)
        return got[1] if got else []

    def _read_legacy_members(self, report: LoadReport) -> list[MemberEntry]:
        """The directory as earlier versions kept it: the peer list (node id, address, region, maybe
        a certificate) and the certificate directory (node id -> certificate), merged."""
        peers_path, certs_path = self.legacy_paths
        got = self._load_directory_file(peers_path, _decode_legacy_peers, report)
        entries: dict[str, MemberEntry] = {}
        for p in got[1] if got else []:
            nid, address, region, cert = p.get("node_id"), p.get("address"), p.get("region"), p.get("cert")
            if isinstance(nid, str) and isinstance(address, str):
                entries[nid] = MemberEntry(nid, address, region if isinstance(region, str) else "",
                                           bytes(cert) if isinstance(cert, (bytes, bytearray)) else b"")
        got_certs = self._load_directory_file(certs_path, _decode_legacy_members, report)
        for nid, cert in (got_certs[1] if got_certs else {}).items():
            e = entries.get(nid)
            if e is None or not e.cert:
                entries[nid] = MemberEntry(nid, e.address if e else "", e.region if e else "", cert)
        return list(entries.values())

    def load_members(self) -> list[MemberEntry]:
        """The stored member file, unverified: the caller re-verifies every certificate.  Right after
        load_into, what it read (with its problems in that report); otherwise a fresh read."""
        if self._handover is not None:
            members, self._handover = self._handover, None
            return members
        return self._read_members(LoadReport())

    def load_into(self, trust: TrustedState, now: float, *, clean_temps: bool = True) -> LoadReport:
        """Re-verify stored roots (in version order) and the newest stored policy that verifies; read
        the member file (see load_members).  ``clean_temps`` first
        removes the temp files of interrupted writes (read-only tools pass False)."""
        report = LoadReport()
        if clean_temps:
            removed = self.remove_stale_temps()
            report.temps_removed = len(removed)
            if removed:
                report.problems.append(
                    f"removed {len(removed)} temp file(s) left by interrupted writes: "
                    + ", ".join(str(p) for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
        roots: list[tuple[int, Path]] = []
        if self.roots_dir.is_dir():
            roots = sorted(
                (int(m.group(1)), p) for p in self.roots_dir.iterdir() if (m := _ROOT_RE.match(p.name))
            )
        for version, path in roots:
            if version <= trust.root_version:
                continue
            try:
                if trust.update_root(self._read(path)):
                    report.roots_loaded += 1
            except (OSError, MeshError) as exc:
                report.problems.append(f"{path}: {exc}")
                break  # later roots cannot chain past a broken one
        for serial in sorted(self._policy_serials(), reverse=True):
            path = self.policy_dir / f"{serial}.msgpack"
            try:
                check = trust.check_policy(self._read(path), now)
            except TrustError as exc:
                if isinstance(exc, ExpiredError):
                    # Fail-static: an expired last-known-good policy is still enforced after a reboot.
                    try:
                        trust.restore_expired_policy(self._read(path), now)
                        report.policy_serial = serial
                        report.problems.append(f"{path}: {exc} (kept: fail-static)")
                        break
                    except (OSError, MeshError) as exc2:
                        report.problems.append(f"{path}: {exc2}")
                        continue
                report.problems.append(f"{path}: {exc}")
                continue
            except (OSError, MeshError) as exc:
                report.problems.append(f"{path}: {exc}")
                continue
            if check.policy.serial != serial:
                report.problems.append(f"{path}: holds serial {check.policy.serial}, not {serial}")
                continue
            trust.accept_policy(check.envelope_bytes, now)
            report.policy_serial = serial
            break
        members = self._read_members(report)
        report.members_loaded = len(members)
        self._handover = members
        return report
