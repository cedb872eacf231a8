"""Durable node state: trusted roots and the last-known-good policy, as exact signed bytes.

Layout under ``data_dir``::

    roots/root.<version>.msgpack   every trusted root after the pinned anchor
    policy/<serial>.msgpack        the newest accepted policies (the last KEEP_POLICIES)
    peers.msgpack                  known peers, for restarts without seeds

Every file is written atomically.  On load everything is re-verified through TrustedState; a corrupt,
truncated or unverifiable file is reported (returned in ``LoadReport.problems``) and skipped: it never
replaces good state, and the newest policy that verifies wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from protocol.errors import ExpiredError, MeshError, TrustError
from protocol.trust import TrustedState

from .fsutil import atomic_write

KEEP_POLICIES = 3
MAX_STATE_FILE_BYTES = 1 << 20
_ROOT_RE = re.compile(r"^root\.(\d+)\.msgpack$")
_POLICY_RE = re.compile(r"^(\d+)\.msgpack$")


@dataclass
class LoadReport:
    roots_loaded: int = 0
    policy_serial: int = 0
    problems: list[str] = field(default_factory=list)


class StateStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.roots_dir = self.dir / "roots"
        self.policy_dir = self.dir / "policy"
        self.peers_path = self.dir / "peers.msgpack"
        self.members_path = self.dir / "members.msgpack"

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

    def save_peers(self, data: bytes) -> None:
        self.ensure()
        atomic_write(self.peers_path, data)

    def save_members(self, certs: dict[str, bytes]) -> None:
        """The member certificate directory (exact signed bytes), so a reboot enforces full sets at once."""
        self.ensure()
        atomic_write(self.members_path, msgspec.msgpack.encode(certs))

    def load_members(self) -> dict[str, bytes]:
        """Stored member certificates, unverified: the caller re-verifies each one."""
        try:
            return msgspec.msgpack.decode(self._read(self.members_path), type=dict[str, bytes])
        except (OSError, MeshError, msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return {}

    def forget_policies_above(self, serial: int) -> None:
        """Drop stored policies from before a policy-key rotation (fast-forward recovery)."""
        for s in self._policy_serials():
            if s > serial:
                (self.policy_dir / f"{s}.msgpack").unlink(missing_ok=True)

    # -- reads --------------------------------------------------------------------------------------
    def _policy_serials(self) -> list[int]:
        if not self.policy_dir.is_dir():
            return []
        return [int(m.group(1)) for p in self.policy_dir.iterdir() if (m := _POLICY_RE.match(p.name))]

    def _read(self, path: Path) -> bytes:
        if path.stat().st_size > MAX_STATE_FILE_BYTES:
            raise MeshError(f"{path}: larger than {MAX_STATE_FILE_BYTES} bytes")
        return path.read_bytes()

    def load_peers(self) -> bytes | None:
        try:
            return self._read(self.peers_path)
        except (OSError, MeshError):
            return None

    def load_into(self, trust: TrustedState, now: float) -> LoadReport:
        """Re-verify stored roots (in version order) and the newest stored policy that verifies."""
        report = LoadReport()
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
        return report
