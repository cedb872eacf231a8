"""The rules a node.toml must follow beyond its types, each broken one a ConfigError naming the key.

Addresses are HOST:PORT, CIDRs are networks, numbers are in range, URLs are http(s); a switch that
weakens security (the file backend, a non-loopback admin listener) needs its ``[overrides]`` entry.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from protocol.errors import MeshError
from protocol.trust.names import parse_network, parse_port_number

from ..checks.ports import parse_expected
from .schema import BACKENDS, ValidateSection

if TYPE_CHECKING:
    from .loading import LoadedConfig


class ConfigError(MeshError):
    """The node configuration is invalid."""


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


def is_loopback(hostport: str) -> bool:
    host, _ = split_hostport(hostport, "admin.listen")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(loaded: LoadedConfig) -> None:
    c = loaded.cfg
    where = str(loaded.path)
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
    if c.admin.enabled and not is_loopback(c.admin.listen) and not c.overrides.admin_non_loopback:
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
    loaded.pagerduty_routing_key()  # a missing, unsafe or empty key file is an error at load, not at the first page


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
