"""Set-up: the hosts, policy versions and processes a scenario describes.

Host ``i < n`` is node ``n{i:05d}`` in region ``i % len(regions)``; host ``n`` is the central
authority (serves the baselines).  Every node is enrolled with the trust anchor and policy serial 1;
each ``publish_at_ms`` of the scenario is one more serial (and, with ``policy.equivocate``, a second
policy signed with the same serial).  Hostile nodes are drawn from the non-seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from protocol.gossip import GossipConfig, Node
from protocol.gossip.membership import CACHE_MAX_BYTES, VerifyCache
from protocol.trust import (
    Authority,
    PolicyDocument,
    Rule,
    TrustedState,
    decode_envelope,
    payload_hash,
    validate_document,
)

from .baselines import AUTHORITY_ID, CentralPullAgent, FloodNode
from .effects import Disk
from .hostile import HostileNode
from .identities import T0, NodeIdentity, make_node
from .kernel import Process
from .scenario import Scenario

CACHE_BYTES_PER_NODE = 8 << 10  # a record, a status and a certificate, estimated as VerifyCache does


@dataclass
class Host:
    idx: int
    ident: NodeIdentity | None
    node_id: str
    address: str
    region: int
    applied: int = 0  # the highest serial its node applied
    disk: Disk = field(default_factory=Disk)
    hostile: bool = False
    started_ms: int = 0  # its process's latest start
    joined_ms: int | None = None  # its first start (a node joining the fleet)


@dataclass
class Version:
    serial: int
    envelope: bytes
    hash: str
    publish_ms: int
    published_at: int | None = None
    applied: dict[int, int] = field(default_factory=dict)  # node index -> first ms with serial >= this
    snap_publish: list[int] | None = None
    snap_done: list[int] | None = None
    kinds_publish: list[int] | None = None  # bytes received by message kind, at the publish
    kinds_done: list[int] | None = None  # ... and when the version had reached every live node
    done_ms: int | None = None
    twin: bytes | None = None  # policy.equivocate: another policy signed with the same serial
    twin_hash: str | None = None


def make_document(rules: int) -> PolicyDocument:
    """A realistic policy of ``rules`` allow rules (size scales with the count)."""
    out = []
    for i in range(rules):
        out.append(Rule(name=f"svc-{i:04d}-ingress", sources=(f"node:n{i:05d}", f"role:app{i % 17}"),
                        to=(f"role:svc{i % 29}",), ports=(f"tcp/{10000 + i}", f"udp/{20000 + i}")))
    return validate_document(PolicyDocument(allow=tuple(out)))


def build_hosts(sc: Scenario, auth: Authority, auth_region: int) -> list[Host]:
    """The n nodes, then the authority (index n)."""
    regions = list(sc.nodes.regions)
    hosts = []
    for i in range(sc.nodes.count):
        r = i % len(regions)
        nid = f"n{i:05d}"
        ip = f"10.{r}.{(i // 250) % 250}.{i % 250 + 1}"
        ident = make_node(auth, nid, region=regions[r], addresses=(ip,), label="sim")
        hosts.append(Host(i, ident, nid, f"{ip}:7946", r))
    hosts.append(Host(sc.nodes.count, None, AUTHORITY_ID, "192.0.2.1:443", auth_region))
    return hosts


def seed_addresses(sc: Scenario, hosts: list[Host]) -> list[str]:
    """The first ``seeds_per_region`` nodes of each region."""
    seeds: list[str] = []
    for r in range(len(sc.nodes.regions)):
        in_r = [h for h in hosts[: sc.nodes.count] if h.region == r]
        seeds += [h.address for h in in_r[: sc.nodes.seeds_per_region]]
    return seeds


def pick_hostile(sc: Scenario, hosts: list[Host], seeds: list[str], rng: random.Random) -> None:
    n = sc.nodes.count
    count = sc.hostile.count or int(round(sc.hostile.fraction * n))
    pool = [h.idx for h in hosts[:n] if h.address not in seeds]
    for i in rng.sample(pool, min(count, len(pool))):
        hosts[i].hostile = True


def build_versions(sc: Scenario, auth: Authority, legit: dict[str, int]) -> tuple[bytes, list[Version]]:
    """The enrolled policy (serial 1) and one version per publish; ``legit`` learns every signed hash."""
    doc = make_document(sc.policy.rules)
    env1 = auth.sign_policy(doc, 1, T0 - 3600, T0 + sc.policy.valid_s)
    legit[payload_hash(decode_envelope(env1, "policy").payload)] = 1
    versions: list[Version] = []
    for k, at in enumerate(sorted(sc.policy.publish_at_ms)):
        serial = k + 2
        issued = T0 + at // 1000
        env = auth.sign_policy(doc, serial, issued, issued + sc.policy.valid_s)
        h = payload_hash(decode_envelope(env, "policy").payload)
        legit[h] = serial
        versions.append(Version(serial, env, h, at))
        if sc.policy.equivocate:
            twin = auth.sign_policy(doc, serial, issued + 1, issued + sc.policy.valid_s)
            th = payload_hash(decode_envelope(twin, "policy").payload)
            legit[th] = serial
            versions[-1].twin, versions[-1].twin_hash = twin, th
    return env1, versions


class ProcessFactory:
    """Builds the process a node runs (per the scenario's protocol) from what its host persisted."""

    def __init__(self, sc: Scenario, cfg: GossipConfig, anchor: bytes, hosts: list[Host], seeds: list[str],
                 enrolled_policy: bytes) -> None:
        self.sc = sc
        self.cfg = cfg
        self.anchor = anchor
        self.hosts = hosts
        self.seeds = seeds
        self.enrolled_policy = enrolled_policy
        # one record and status per member is held: size the cache for the whole fleet (its default
        # suits one daemon; at 100,000 members it would clear and re-verify all the time)
        self.cache = VerifyCache(max_bytes=max(CACHE_MAX_BYTES, sc.nodes.count * CACHE_BYTES_PER_NODE))
        # signature and format checks of roots and policies, shared by every node (see TrustedState)
        self.verified: dict[tuple[bytes, bytes], object] = {}
        self._flood_peers: list[tuple[str, str]] | None = None

    def trust_from_disk(self, disk: Disk, wall: float) -> TrustedState:
        trust = TrustedState(self.anchor, verified=self.verified)
        trust.update_root_chain(disk.roots)
        if disk.policy is not None:
            trust.accept_policy(disk.policy, wall)
        return trust

    def make(self, h: Host, trust: TrustedState, epoch: int) -> Process:
        sc, cfg = self.sc, self.cfg
        assert h.ident is not None
        rng = random.Random(f"{sc.seed}:node:{h.idx}:{epoch}")
        if sc.protocol == "gossip":
            node = Node(cfg, trust, h.node_id, h.ident.cert_bytes, h.ident.identity_seed, h.address,
                        self.seeds, rng, h.disk.members or (), verify_cache=self.cache,
                        enforced=(trust.serial, ""))  # the boot apply of the persisted policy
            if h.hostile:
                return HostileNode(node, list(sc.hostile.behaviours), self.enrolled_policy)
            return node
        n = sc.nodes.count
        if sc.protocol == "central-pull":
            return CentralPullAgent(trust, self.hosts[n].address, sc.baselines.pull_interval_ms,
                                    sc.baselines.request_bytes, rng)
        if self._flood_peers is None:
            self._flood_peers = [(x.node_id, x.address) for x in self.hosts[:n]]
        return FloodNode(trust, h.node_id, self._flood_peers, cfg.fanout, cfg.announce_rounds,
                         cfg.announce_interval_ms, rng, self_index=h.idx)
