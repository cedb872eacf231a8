"""Loading a node.toml: read, convert to the schema, validate; paths resolved against the file.

``LoadedConfig`` is what the daemon holds: the validated config, where it came from, the PagerDuty key
(read from a private file), and ``active_overrides()``, the switches that weaken security and are on,
which the daemon logs at start, shows in status and exports as a metric.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .schema import NodeConfig
from .validation import ConfigError, is_loopback, validate

# A PagerDuty integration (routing) key: 32 letters and digits.
_ROUTING_KEY_RE = re.compile(r"\A[A-Za-z0-9]{32}\Z")
_ROUTING_KEY_FILE_MAX_BYTES = 4096


@dataclass(frozen=True)
class LoadedConfig:
    path: Path
    base: Path
    cfg: NodeConfig

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.base / p

    def pagerduty_routing_key(self) -> str | None:
        """The PagerDuty integration key, or None when PagerDuty is off (ConfigError if the file is unsafe)."""
        name = self.cfg.alerts.pagerduty_routing_key_file
        return read_routing_key(self.resolve(name), f"{self.path}: alerts.pagerduty_routing_key_file") if name else None

    def active_overrides(self) -> list[str]:
        o = self.cfg.overrides
        out = []
        if o.allow_file_backend and self.cfg.enforce.backend == "file":
            out.append("allow_file_backend")
        if o.admin_non_loopback and not is_loopback(self.cfg.admin.listen):
            out.append("admin_non_loopback")
        if o.break_glass_cidrs:
            out.append("break_glass_cidrs")
        if not self.cfg.validate.peer_probes:
            out.append("validate.peer_probes_off")
        return out


def read_routing_key(path: Path, what: str) -> str:
    """Read a PagerDuty routing key from a private file: it must exist, be a regular file that neither
    group nor others can read or write (0600 or stricter), and hold one 32-character key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"{what}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can reach "
                              f"the PagerDuty key; make it private (chmod 600 {path})")
        data = os.read(fd, _ROUTING_KEY_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if not text:
        raise ConfigError(f"{what}: {path} is empty; it must hold the PagerDuty Events v2 integration key")
    if len(data) > _ROUTING_KEY_FILE_MAX_BYTES or not _ROUTING_KEY_RE.match(text):
        raise ConfigError(f"{what}: {path} does not hold a PagerDuty integration key (32 letters and digits, "
                          "the \"Integration Key\" of an Events API v2 integration)")
    return text


def load_config(path: Path) -> LoadedConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        cfg = msgspec.convert(raw, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    loaded = LoadedConfig(path=path, base=path.resolve().parent, cfg=cfg)
    validate(loaded)
    return loaded
