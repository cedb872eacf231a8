"""Scenario files (TOML): schema, loading with one-line errors, CLI overrides.

Every table is a msgspec struct with ``forbid_unknown_fields``, so a typo is an error naming the key.
Times are integer virtual milliseconds; one-way latencies are float milliseconds.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from protocol.gossip import GossipConfig

SCENARIO_DIR = Path(__file__).parent / "scenarios"
PROTOCOLS = ("gossip", "central-pull", "flood")


class ScenarioError(Exception):
    """A scenario file or override is invalid (one line, no traceback)."""


class _T(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NodesCfg(_T):
    count: int = 100
    regions: list[str] = msgspec.field(default_factory=lambda: ["lan"])
    seeds_per_region: int = 1
    join_spread_ms: int = 3000
    # Host costs the network model does not see, calibrated against real meshnode processes
    # (scenarios/loopback-12.toml vs tests/bench_daemon.py): receive-side processing of one message
    # (event loop, decrypt, decode, handle, persist) and the enforcement apply after a version is accepted.
    process_ms: float = 0.0
    apply_ms: int = 0
    # 0: each node has a CPU of its own (process_ms is a delay).  N > 0: the nodes share one host's N cores
    # (as the benchmarks' daemons do): a message is handled after process_ms of CPU once its node's event
    # loop and a core are free, in order of arrival, so a burst of messages across the host queues.
    host_cores: int = 0
    # With host_cores: the CPU of a message carrying a policy or root body (decrypt, verify, store, forward);
    # None: process_ms like any other message.
    body_process_ms: float | None = None
    # With host_cores: the CPU of applying a newly accepted version (store, render, load, sign the status),
    # on the host's cores after the message that brought it (the daemon forwards first); the node counts
    # it applied when that is done (plus apply_ms).  None: no CPU charged (apply_ms alone).
    apply_cpu_ms: float | None = None
    # Start from a converged directory: every node boots at 0 and holds every other's record and
    # status from the start (one shared snapshot plus per-node overlays: memory O(n), not O(n^2)).
    converged: bool = False
    # With ``converged``: this fraction of the nodes is not in the snapshot and joins during the run,
    # spread uniformly over ``join_window_ms`` (from, to).
    joins: float = 0.0
    join_window_ms: list[int] = msgspec.field(default_factory=lambda: [0, 0])


TRANSPORTS = ("tcp", "mixed", "datagram")


class NetworkCfg(_T):
    # "tcp": every message on the TCP model; "mixed": as the daemon, small dissemination messages as
    # datagrams (simulations.datagrams), the rest on TCP; "datagram": every message a lossy datagram
    transport: Literal["tcp", "mixed", "datagram"] = "tcp"
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_ms: int = 20
    jitter: float = 0.1  # fraction of the one-way latency, uniform
    intra_region_ms: float = 0.25
    cross_region_ms: float = 50.0
    latency_ms: dict[str, float] = msgspec.field(default_factory=dict)  # "a.b" -> one-way ms
    bandwidth_mbps: float = 1000.0


class TcpCfg(_T):
    """The transport model's constants (Linux defaults; calibrate against real processes)."""

    recovery: Literal["rack-tlp", "rto"] = "rack-tlp"  # Linux default: RACK + tail loss probe; "rto": RTO only
    min_rto_ms: int = 200
    tlp_min_ms: int = 10
    delayed_ack_ms: int = 200  # added to the probe timeout when one segment is in flight (RFC 8985)
    max_rto_ms: int = 120_000
    syn_rto_ms: int = 1000
    connect_timeout_ms: int = 3000
    user_timeout_ms: int = 20_000
    reconnect_backoff_ms: int = 500
    reconnect_backoff_max_ms: int = 30_000
    connect_rtts: float = 3.0  # TCP handshake + WebSocket upgrade + Noise XX before the first frame
    mss: int = 1448
    header_bytes: int = 52  # IPv4 + TCP with timestamps, per segment
    frame_overhead_bytes: int = 20  # WebSocket header + Noise AEAD tag, per message


class PolicyCfg(_T):
    rules: int = 20
    valid_s: int = 7 * 86400
    publish_at_ms: list[int] = msgspec.field(default_factory=lambda: [20_000])
    publisher_region: str | None = None
    # a leaked or misused policy key: every publish also signs a second, different policy with the
    # same serial, submitted at the same moment through another node (every node must end on the
    # lower content hash, changing at most once)
    equivocate: bool = False


class BaselineCfg(_T):
    pull_interval_ms: int = 30_000
    authority_region: str | None = None
    request_bytes: int = 400
    not_modified_bytes: int = 250
    response_overhead_bytes: int = 350


FAULT_KINDS = ("partition", "region_outage", "crash", "authority_outage", "loss",
               "kill9", "disk_full", "clock_skew", "flush_ruleset", "fd_pressure")
NODE_FAULTS = ("kill9", "disk_full", "clock_skew", "flush_ruleset", "fd_pressure")  # see simulations/drill/


class Fault(_T):
    kind: Literal["partition", "region_outage", "crash", "leave", "authority_outage", "loss",
                  "kill9", "disk_full", "clock_skew", "flush_ruleset", "fd_pressure"]
    at_ms: int
    until_ms: int | None = None
    regions: list[str] = msgspec.field(default_factory=list)
    fraction: float = 0.0
    count: int = 0
    loss: float = 0.0
    name: str = ""
    # The chaos-drill faults (simulations/drill/schedule.py): the nodes are drawn from the seed.
    restart_after_ms: int = 2000  # kill9: the killed process starts again this long after
    after_publish: bool = False  # kill9: kill the node that acknowledged each publish in the window
    skew_s: float = 0.0  # clock_skew: the node's wall clock is this far ahead (negative: behind)
    nofile: int = 0  # fd_pressure: the process's RLIMIT_NOFILE


class HostileCfg(_T):
    count: int = 0
    fraction: float = 0.0
    behaviours: list[Literal["replay", "withhold", "lure", "lie", "flood"]] = msgspec.field(
        default_factory=lambda: ["replay", "withhold", "lure"])


class ChecksCfg(_T):
    require_convergence: bool = True
    settle_ms: int = 10_000
    # The Byzantine guarantee as an invariant: every live honest node applies every published version
    # within this many ms of its publish (0: not checked).  See simulations/hostile.py.
    convergence_bound_ms: int = 0
    false_detection_lookback_ms: int = 90_000


class MeasureCfg(_T):
    idle_window_ms: int = 10_000
    sample_ms: int = 50


class Scenario(_T):
    name: str
    description: str = ""
    duration_ms: int = 60_000
    seed: int = 1
    protocol: Literal["gossip", "central-pull", "flood"] = "gossip"
    clock_skew_s: float = 0.0
    nodes: NodesCfg = msgspec.field(default_factory=NodesCfg)
    network: NetworkCfg = msgspec.field(default_factory=NetworkCfg)
    tcp: TcpCfg = msgspec.field(default_factory=TcpCfg)
    gossip: dict[str, int] = msgspec.field(default_factory=dict)
    policy: PolicyCfg = msgspec.field(default_factory=PolicyCfg)
    baselines: BaselineCfg = msgspec.field(default_factory=BaselineCfg)
    faults: list[Fault] = msgspec.field(default_factory=list)
    hostile: HostileCfg = msgspec.field(default_factory=HostileCfg)
    checks: ChecksCfg = msgspec.field(default_factory=ChecksCfg)
    measure: MeasureCfg = msgspec.field(default_factory=MeasureCfg)

    def gossip_config(self) -> GossipConfig:
        try:
            return GossipConfig.from_mapping(dict(self.gossip))
        except (ValueError, TypeError) as exc:
            raise ScenarioError(f"scenario {self.name}: [gossip]: {exc}") from None


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (SCENARIO_DIR / name_or_path, SCENARIO_DIR / f"{name_or_path}.toml"):
        if cand.exists():
            return cand
    raise ScenarioError(f"scenario {name_or_path!r} not found (a path, or one of: {', '.join(bundled())})")


def bundled() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load(name_or_path: str) -> Scenario:
    path = resolve_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: invalid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return from_dict(data, str(path))


def from_dict(data: dict, origin: str = "scenario") -> Scenario:
    try:
        sc = msgspec.convert(data, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{origin}: {exc}".replace("`$.", "`")) from None
    validate(sc, origin)
    return sc


def validate(sc: Scenario, origin: str = "scenario") -> None:
    def bad(msg: str) -> ScenarioError:
        return ScenarioError(f"{origin}: {msg}")

    if sc.nodes.count < 1:
        raise bad("nodes.count must be >= 1")
    if sc.nodes.host_cores < 0:
        raise bad(f"nodes.host_cores must be >= 0 (0: a CPU per node), got {sc.nodes.host_cores}")
    for name, cost in (("body_process_ms", sc.nodes.body_process_ms), ("apply_cpu_ms", sc.nodes.apply_cpu_ms)):
        if cost is not None and cost < 0:
            raise bad(f"nodes.{name} must be >= 0, got {cost}")
    if not sc.nodes.regions or len(set(sc.nodes.regions)) != len(sc.nodes.regions):
        raise bad("nodes.regions must be a non-empty list of distinct names")
    if sc.duration_ms < 1:
        raise bad("duration_ms must be positive")
    for name, value in (("network.loss", sc.network.loss), ("network.duplicate", sc.network.duplicate),
                        ("network.reorder", sc.network.reorder)):
        if not 0.0 <= value < 1.0:
            raise bad(f"{name} must be in [0, 1), got {value}")
    regions = set(sc.nodes.regions)
    for key in sc.network.latency_ms:
        parts = key.split(".")
        if len(parts) != 2 or not set(parts) <= regions:
            raise bad(f"network.latency_ms key {key!r} must be 'REGION.REGION' with known regions")
    for i, f in enumerate(sc.faults):
        where = f"faults[{i}] ({f.kind})"
        if f.until_ms is not None and f.until_ms <= f.at_ms:
            raise bad(f"{where}: until_ms must be after at_ms")
        if not set(f.regions) <= regions:
            raise bad(f"{where}: unknown region in {f.regions}")
        if f.kind == "partition" and not f.regions and not f.fraction and not f.count:
            raise bad(f"{where}: a partition needs regions, fraction or count")
        if f.kind == "region_outage" and not f.regions:
            raise bad(f"{where}: a region outage needs regions")
        if f.kind in ("crash", "leave") and not f.fraction and not f.count:
            raise bad(f"{where}: a {f.kind} needs fraction or count")
        if not 0.0 <= f.fraction <= 1.0 or not 0.0 <= f.loss < 1.0:
            raise bad(f"{where}: fraction and loss must be within [0, 1]")
        if f.kind in NODE_FAULTS:
            _validate_node_fault(f, where, sc.nodes.count, bad)
    if sc.policy.publisher_region is not None and sc.policy.publisher_region not in regions:
        raise bad(f"policy.publisher_region {sc.policy.publisher_region!r} is not a region")
    if sc.baselines.authority_region is not None and sc.baselines.authority_region not in regions:
        raise bad(f"baselines.authority_region {sc.baselines.authority_region!r} is not a region")
    if not sc.policy.publish_at_ms:
        raise bad("policy.publish_at_ms must list at least one time")
    if any(t >= sc.duration_ms for t in sc.policy.publish_at_ms):
        raise bad("policy.publish_at_ms must be before duration_ms")
    if not 0.0 <= sc.nodes.joins < 1.0 or (sc.nodes.joins and not sc.nodes.converged):
        raise bad("nodes.joins must be in [0, 1), and only with nodes.converged (others join anyway)")
    jw = sc.nodes.join_window_ms
    if len(jw) != 2 or not 0 <= jw[0] <= jw[1] <= sc.duration_ms:
        raise bad("nodes.join_window_ms must be [from, to] within the run")
    if sc.policy.rules < 1 or sc.policy.rules > 4096:
        raise bad("policy.rules must be 1..4096")
    sc.gossip_config()


def _validate_node_fault(f: Fault, where: str, n: int, bad: Callable[[str], ScenarioError]) -> None:
    if f.kind != "flush_ruleset" and f.until_ms is None:
        raise bad(f"{where}: needs until_ms (when the fault heals, or the end of the kill window)")
    if f.count < 0 or f.count > n:
        raise bad(f"{where}: count must be 0..nodes.count")
    if f.kind == "kill9" and not f.after_publish and f.count < 1:
        raise bad(f"{where}: kill9 needs count >= 1 (kills at random moments) or after_publish = true")
    if f.kind == "kill9" and not 0 < f.restart_after_ms <= 600_000:
        raise bad(f"{where}: restart_after_ms must be 1..600000")
    if f.kind == "clock_skew" and not f.skew_s:
        raise bad(f"{where}: clock_skew needs skew_s (seconds, non-zero)")
    if f.kind == "fd_pressure" and not 16 <= f.nofile <= 65536:
        raise bad(f"{where}: fd_pressure needs nofile in 16..65536")


def override(sc: Scenario, *, nodes: int | None = None, seed: int | None = None, loss: float | None = None,
             protocol: str | None = None, duration_ms: int | None = None, transport: str | None = None) -> Scenario:
    changes: dict = {}
    if seed is not None:
        changes["seed"] = seed
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise ScenarioError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
        changes["protocol"] = protocol
    if duration_ms is not None:
        changes["duration_ms"] = duration_ms
    if nodes is not None:
        changes["nodes"] = msgspec.structs.replace(sc.nodes, count=nodes)
    network = sc.network
    if loss is not None:
        network = msgspec.structs.replace(network, loss=loss)
    if transport is not None:
        if transport not in TRANSPORTS:
            raise ScenarioError(f"unknown transport {transport!r} (choose from {', '.join(TRANSPORTS)})")
        network = msgspec.structs.replace(network, transport=transport)
    if network is not sc.network:
        changes["network"] = network
    new = msgspec.structs.replace(sc, **changes)
    validate(new, f"scenario {sc.name} (with overrides)")
    return new
