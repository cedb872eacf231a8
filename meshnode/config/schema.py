"""What a node.toml may say: its sections, their fields and their defaults (msgspec structs).

Unknown keys are errors (``forbid_unknown_fields``). The types are checked when the TOML is converted
(``meshnode.config.loading``); the rules between values are in ``meshnode.config.validation``.
"""

from __future__ import annotations

import msgspec

DEFAULT_MESH_PORT = 7946
DEFAULT_ADMIN_PORT = 9946
BACKENDS = ("nftables", "iptables", "file")


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
