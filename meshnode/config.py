"""Node configuration (TOML), validated with clear errors. Unknown keys are errors.

Every switch that weakens security lives in ``[overrides]``; ``active_overrides()`` lists those that are
on, and the daemon logs them at start, shows them in status and exports them as a metric.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from protocol.errors import MeshError
from protocol.trust.names import parse_network, parse_port_number

from .checks.ports import parse_expected

DEFAULT_MESH_PORT = 7946
DEFAULT_ADMIN_PORT = 9946
BACKENDS = ("nftables", "iptables", "file")
# A PagerDuty integration (routing) key: 32 letters and digits.
_ROUTING_KEY_RE = re.compile(r"\A[A-Za-z0-9]{32}\Z")
_ROUTING_KEY_FILE_MAX_BYTES = 4096


class ConfigError(MeshError):
    """The node configuration is invalid."""


class NodeSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    region: str
    data_dir: str = "state"


class IdentitySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert: str = "node.cert"
    identity_key: str = "secrets/identity.key"
    static_key: str = "secrets/static.key"


class TrustSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    root: str = "root.msgpack"
    clock_skew_s: int = 300


class MeshSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = f"0.0.0.0:{DEFAULT_MESH_PORT}"
    advertise: str = ""
    seeds: list[str] = []
    source_address: str = ""  # local IP to dial peers from (multi-homed hosts); empty = the kernel's choice
    # The largest operator request (publish: one policy envelope of up to 1 MiB plus a root chain).
    # Gossip channels always reassemble at most the gossip message cap (protocol.gossip.wire).
    max_message_bytes: int = 4 << 20
    handshake_timeout_ms: int = 5000
    handshake_rate_per_s: float = 20.0
    handshake_burst: int = 40
    max_peers: int = 512
    # Before authentication (accept -> HTTP upgrade -> Noise handshake, all within handshake_timeout_ms
    # of the accept): at most this many pending connections per remote address, and overall.
    preauth_per_source: int = 16
    preauth_max: int = 256
    # Authenticated channels one identity may hold at once (a new one closes its oldest).
    max_channels_per_peer: int = 2
    # Small dissemination messages as encrypted UDP datagrams on the mesh port (the same port number),
    # keyed from each channel's handshake; a peer whose UDP path does not answer stays on the stream.
    datagrams: bool = True


class AdminSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"
    enabled: bool = True


class EnforceSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: str = "nftables"
    table: str = "policymesh"
    icmp: bool = True
    drift_check_s: float = 30.0
    # Who may open the mesh port besides known members: new members join from here. Every connection is
    # authenticated by the Noise handshake (and rate limited); narrow it to your node networks if you like.
    mesh_join_cidrs: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    file: str = "ruleset.nft"
    log_rate: str = "5/second"


class SourcesSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    urls: list[str] = []
    poll_s: float = 60.0
    drop_dir: str = ""
    drop_poll_s: float = 2.0


class AlertsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    webhook_urls: list[str] = []
    # A file (mode 0600) holding the PagerDuty Events v2 integration key; empty: PagerDuty off.
    pagerduty_routing_key_file: str = ""
    pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"


# ssh, telnet, http(s), docker, etcd, mysql, postgres, redis, http-alt, elasticsearch, mongodb
DEFAULT_PEER_PROBE_PORTS = (22, 23, 80, 443, 2375, 2379, 3306, 5432, 6379, 8080, 9200, 27017)


class ValidateSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The services this node is meant to offer ("tcp/5432", "udp/53"); the port audit alerts on a listener
    # that the policy exposes but is not declared here, and on a declared service with nothing listening.
    expected_listeners: list[str] = []
    port_audit_s: float = 60.0  # 0: no port audit
    # Handshake abuse: a source with this many failed or rate-limited handshakes within the window is one
    # alert, resolved after a window without any.
    abuse_threshold: int = 20
    abuse_window_s: float = 60.0
    block_abusers_s: int = 0  # > 0: also drop such a source for this long (an nftables timeout set)
    # Port scans (nftables only; other backends skip it): a source whose packets the default dropped on
    # this many distinct ports within the window is one alert (blocked like handshake abuse with
    # block_abusers_s), resolved after a window without any dropped attempt. 0: off (not rendered). A
    # member's threshold is raised by what its external probes (peer_probe_*) may try within the window.
    port_scan_ports: int = 20
    port_scan_window_s: int = 60
    # External validation (meshnode/checks/peer_probe.py): every interval (jittered +-25%) probe a few
    # random members with real TCP connections, on ports the signed policy refuses to this node, ports it
    # opens to it, and the mesh port. Off only by peer_probes = false, which is an active override.
    peer_probes: bool = True
    peer_probe_interval_s: float = 30.0
    peer_probe_targets: int = 1  # members probed per round
    peer_probe_refused: int = 3  # ports the policy refuses to us, per target
    peer_probe_reachable: int = 2  # ports the policy opens to us, per target (the mesh port comes on top)
    peer_probe_timeout_s: float = 2.0  # a connection attempt without an answer by then was dropped
    # Ports to try as "must be refused" besides the ports every policy rule names (commonly attacked ones).
    peer_probe_ports: list[int] = msgspec.field(default_factory=lambda: list(DEFAULT_PEER_PROBE_PORTS))
    # A member suspect or dead (SWIM) for this long is one alert; a region whose every member is, one alert.
    unreachable_after_s: float = 120.0  # 0: no unreachable alerts


class OverridesSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allow_file_backend: bool = False
    admin_non_loopback: bool = False
    break_glass_cidrs: list[str] = []
    allow_plain_http_sources: bool = True  # envelopes are self-authenticating; kept for visibility


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cluster: str
    node: NodeSection
    identity: IdentitySection = IdentitySection()
    trust: TrustSection = TrustSection()
    mesh: MeshSection = MeshSection()
    admin: AdminSection = AdminSection()
    enforce: EnforceSection = EnforceSection()
    sources: SourcesSection = SourcesSection()
    gossip: dict[str, int] = {}  # overrides of protocol.gossip.config.GossipConfig fields (ms)
    alerts: AlertsSection = AlertsSection()
    validate: ValidateSection = ValidateSection()
    overrides: OverridesSection = OverridesSection()


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
        if o.admin_non_loopback and not _is_loopback(self.cfg.admin.listen):
            out.append("admin_non_loopback")
        if o.break_glass_cidrs:
            out.append("break_glass_cidrs")
        if not self.cfg.validate.peer_probes:
            out.append("validate.peer_probes_off")
        return out


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        number = parse_port_number(port)
    except ValueError:
        number = -1
    if not sep or not host or number < 0 or not host.isascii() or not host.isprintable():
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT")
    return host, number


def _is_loopback(hostport: str) -> bool:
    host, _ = split_hostport(hostport, "admin.listen")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def validate(lc: LoadedConfig) -> None:
    c = lc.cfg
    where = str(lc.path)
    split_hostport(c.mesh.listen, f"{where}: mesh.listen")
    if c.mesh.advertise:
        split_hostport(c.mesh.advertise, f"{where}: mesh.advertise")
    for s in c.mesh.seeds:
        split_hostport(s, f"{where}: mesh.seeds")
    split_hostport(c.admin.listen, f"{where}: admin.listen")
    if c.enforce.backend not in BACKENDS:
        raise ConfigError(f"{where}: enforce.backend = {c.enforce.backend!r}: one of {', '.join(BACKENDS)}")
    if c.enforce.backend == "file" and not c.overrides.allow_file_backend:
        raise ConfigError(
            f"{where}: enforce.backend = \"file\" enforces nothing; it needs the explicit override "
            "[overrides] allow_file_backend = true"
        )
    if c.admin.enabled and not _is_loopback(c.admin.listen) and not c.overrides.admin_non_loopback:
        raise ConfigError(
            f"{where}: admin.listen = {c.admin.listen!r} is not loopback; it needs the explicit override "
            "[overrides] admin_non_loopback = true"
        )
    for cidr in c.enforce.mesh_join_cidrs:
        try:
            parse_network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: enforce.mesh_join_cidrs: {exc}") from None
    for cidr in c.overrides.break_glass_cidrs:
        try:
            parse_network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: overrides.break_glass_cidrs: {exc}") from None
    if c.trust.clock_skew_s < 0 or c.trust.clock_skew_s > 86400:
        raise ConfigError(f"{where}: trust.clock_skew_s must be 0..86400")
    if not 1 <= c.mesh.preauth_per_source <= c.mesh.preauth_max <= 65536:
        raise ConfigError(f"{where}: mesh.preauth_per_source must be 1..preauth_max, preauth_max at most 65536")
    if not 1 <= c.mesh.max_channels_per_peer <= 16:
        raise ConfigError(f"{where}: mesh.max_channels_per_peer must be 1..16")
    if not 100 <= c.mesh.handshake_timeout_ms <= 120_000:
        raise ConfigError(f"{where}: mesh.handshake_timeout_ms must be 100..120000")
    if not 2 << 20 <= c.mesh.max_message_bytes <= 64 << 20:
        raise ConfigError(f"{where}: mesh.max_message_bytes must be 2 MiB..64 MiB (it must fit a 1 MiB policy)")
    try:
        from protocol.gossip import GossipConfig

        GossipConfig.from_mapping(dict(c.gossip))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: [gossip]: {exc}") from None
    for url in c.sources.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: sources.urls: {url!r} is not an http(s) URL")
    for url in c.alerts.webhook_urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: alerts.webhook_urls: {url!r} is not an http(s) URL")
    if len(set(c.alerts.webhook_urls)) != len(c.alerts.webhook_urls):
        raise ConfigError(f"{where}: alerts.webhook_urls: a URL is listed twice")
    if not c.alerts.pagerduty_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: alerts.pagerduty_url: {c.alerts.pagerduty_url!r} is not an http(s) URL")
    _validate_checks(c.validate, c.enforce.backend, where)
    lc.pagerduty_routing_key()  # a missing, unsafe or empty key file is an error at load, not at the first page


def _validate_checks(v: ValidateSection, backend: str, where: str) -> None:
    try:
        parse_expected(v.expected_listeners)
    except ValueError as exc:
        raise ConfigError(f"{where}: validate.expected_listeners: {exc}") from None
    if v.port_audit_s != 0 and not 5 <= v.port_audit_s <= 86400:
        raise ConfigError(f"{where}: validate.port_audit_s must be 0 (off) or 5..86400")
    if not 1 <= v.abuse_threshold <= 1_000_000 or not 1 <= v.abuse_window_s <= 86400:
        raise ConfigError(f"{where}: validate.abuse_threshold must be 1..1000000, abuse_window_s 1..86400")
    if not 0 <= v.block_abusers_s <= 7 * 86400:
        raise ConfigError(f"{where}: validate.block_abusers_s must be 0 (off) .. 604800 (a week)")
    if v.block_abusers_s and backend != "nftables":
        raise ConfigError(f"{where}: validate.block_abusers_s needs enforce.backend = \"nftables\" (a timeout set)")
    if v.port_scan_ports != 0 and not 2 <= v.port_scan_ports <= 65535:
        raise ConfigError(f"{where}: validate.port_scan_ports must be 0 (off) or 2..65535")
    if not 10 <= v.port_scan_window_s <= 3600:
        raise ConfigError(f"{where}: validate.port_scan_window_s must be 10..3600")
    if not 5 <= v.peer_probe_interval_s <= 86400:
        raise ConfigError(f"{where}: validate.peer_probe_interval_s must be 5..86400")
    if not 1 <= v.peer_probe_targets <= 8 or not 0 <= v.peer_probe_refused <= 16 \
            or not 0 <= v.peer_probe_reachable <= 16:
        raise ConfigError(f"{where}: validate.peer_probe_targets must be 1..8, peer_probe_refused and "
                          "peer_probe_reachable 0..16 (a probe round stays a few connections)")
    if not 0.1 <= v.peer_probe_timeout_s <= 30:
        raise ConfigError(f"{where}: validate.peer_probe_timeout_s must be 0.1..30")
    if len(v.peer_probe_ports) > 256 or any(not 1 <= p <= 65535 for p in v.peer_probe_ports):
        raise ConfigError(f"{where}: validate.peer_probe_ports: at most 256 ports, each 1..65535")
    if v.unreachable_after_s != 0 and not 10 <= v.unreachable_after_s <= 7 * 86400:
        raise ConfigError(f"{where}: validate.unreachable_after_s must be 0 (off) or 10..604800")


def render_config(
    *,
    cluster: str,
    node_id: str,
    region: str,
    listen: str,
    advertise: str,
    seeds: list[str],
    admin_listen: str,
    backend: str = "nftables",
    allow_file_backend: bool = False,
    source_address: str = "",
    gossip: Mapping[str, int] | None = None,
) -> str:
    """The node.toml that `meshctl node enroll` writes: a working config with secure defaults.

    ``source_address`` (the local IP to dial peers from) and ``gossip`` (overrides of the gossip
    timers, in ms) are written only when given."""
    seeds_s = ", ".join(f'"{s}"' for s in seeds)
    source_line = f'\nsource_address = "{source_address}"' if source_address else ""
    gossip_section = "".join(f"\n{key} = {int(value)}" for key, value in (gossip or {}).items())
    gossip_section = f"\n[gossip]{gossip_section}\n" if gossip_section else ""
    return f"""# policymesh node configuration, written by `meshctl node enroll`.
# Paths are relative to this file. Unknown keys are errors.
cluster = "{cluster}"

[node]
id = "{node_id}"
region = "{region}"
data_dir = "state"            # trusted roots and last-known-good policy (exact signed bytes)

[identity]
cert = "node.cert"
identity_key = "secrets/identity.key"
static_key = "secrets/static.key"

[trust]
root = "root.msgpack"         # the pinned trust anchor (authority root metadata)
clock_skew_s = 300

[mesh]
listen = "{listen}"
advertise = "{advertise}"{source_line}
seeds = [{seeds_s}]

[admin]
listen = "{admin_listen}"     # /healthz /readyz /v1/status /metrics; loopback only unless overridden

[enforce]
backend = "{backend}"         # nftables | iptables | file (file enforces nothing: needs an override)
table = "policymesh"
icmp = true
drift_check_s = 30
mesh_join_cidrs = ["0.0.0.0/0", "::/0"]  # new members join from here; Noise authenticates every connection

[sources]
urls = []                     # plain HTTP(S) URLs serving signed policy envelopes
poll_s = 60
drop_dir = ""                 # a directory watched for signed policy files (air-gapped hosts)

[overrides]
# Each switch here weakens a protection; active ones are logged at start, shown in status and metrics.
allow_file_backend = {"true" if allow_file_backend else "false"}
admin_non_loopback = false
break_glass_cidrs = []
{gossip_section}"""
