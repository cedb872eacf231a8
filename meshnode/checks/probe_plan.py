"""External validation, the pure part: which members to probe from outside, on which TCP ports, and what
each answer means. Seeded and deterministic (the caller passes a ``random.Random``).

    plan = plan_round(policy, own_cert, member_certs, advertised={"n2": "10.0.0.2:7946"}, rng=rng,
                      budget=ProbeBudget(targets=1, refused=3, reachable=2, extra_ports=(22, 8080)),
                      held={"n2": {9999}}, now=time.time())
    # [ProbeTarget("n2", host="10.0.0.2", source="10.0.0.1",
    #              ports=(Expectation(9999, "refused"), Expectation(5432, "refused"), ..., Expectation(7946, "mesh")))]

**What the policy expects.** For each target, the ruleset that the target's own enforcer renders for the
signed policy (``meshnode.enforce.render`` with the target's certificate, the members' certificates and
the target's mesh port) is evaluated for a new TCP connection from this node's source address
(:meth:`Ruleset.evaluate`). A port it drops or rejects **must be refused** to us; a port it accepts
**must be reachable**; the mesh port is always reachable by members (the interlock). The target's local
options are not known to the prober: its break-glass CIDRs (a prober inside one sees every port open:
correctly reported as holes, since that override exposes them) and ``default_inbound``.

**Candidate ports.** Every TCP port an allow rule names (both ends of a range), where listeners are likely,
plus ``[validate] peer_probe_ports`` (commonly attacked ports). Only TCP is probed: a UDP probe cannot tell
"accepted" from "dropped" without an application answer.

**Outcomes** of one connection attempt, and what they mean (see :func:`judge`):

* ``open``: the TCP handshake completed: the path and the target's firewall let us in and something listens.
  On a port that must be refused this is an **enforcement hole** (``hole``), whatever table, tool or device
  let it through: another nftables table, iptables-legacy, a flushed ruleset, a NAT in front of the host.
* ``closed``: a TCP RST or ICMP port-unreachable (``ECONNREFUSED``): either nothing listens there and the
  firewall let the packet through, or the firewall rejected it (policy default ``reject``). The two cannot
  be told apart from outside, so ``closed`` is never a finding: on a refused port the port is not
  reachable (``ok``), on a reachable port nothing listens (``no_listener``: the target's own port audit
  owns "a declared service is down").
* ``filtered``: no answer within the timeout, or ICMP host/net unreachable or administratively
  prohibited (``EHOSTUNREACH``/``ENETUNREACH``): something dropped it. On a refused port that is the
  policy working (``ok``); on a port the policy opens to us it is ``blocked`` (the policy is
  over-enforced, or a network firewall drops it) — but only when the mesh port answered in the same
  probe, so a host that is down or partitioned is not reported as blocked (the unreachable alert covers it).
* ``error``: the probe itself failed (our source address is gone, our own output filter refused it):
  no conclusion about the target (``unknown``).

A hole can only be seen where something listens: an accept-all in another table in front of a port with
no listener answers ``closed``. That is the exposure that matters (an attacker sees the same), and the
port audit on the target reports listeners the policy does not expect.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from protocol.errors import MeshError
from protocol.trust.metadata import Certificate, PolicyVersion
from protocol.trust.policy import parse_port

from ..config import split_hostport
from ..enforce.model import RenderOptions
from ..enforce.render import render

REFUSED, REACHABLE, MESH = "refused", "reachable", "mesh"
MAX_CANDIDATES = 64  # candidate ports judged per target and round (a random sample; held ports on top)
OPEN, CLOSED, FILTERED, ERROR = "open", "closed", "filtered", "error"
OK, HOLE, BLOCKED, NO_LISTENER, UNKNOWN = "ok", "hole", "blocked", "no_listener", "unknown"


@dataclass(frozen=True, slots=True)
class ProbeBudget:
    """How much one round may probe: ``targets`` members, per target ``refused`` ports the policy refuses
    to us and ``reachable`` ports it opens to us (plus the mesh port, plus any port with an open finding
    on that target, which is re-probed until it clears)."""

    targets: int = 1
    refused: int = 3
    reachable: int = 2
    extra_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Expectation:
    port: int
    expect: str  # REFUSED | REACHABLE | MESH


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One member to probe: at ``host`` (an address of its certificate), from our ``source`` address (the
    one the policy judges), on ``ports``."""

    node_id: str
    host: str
    source: str
    ports: tuple[Expectation, ...]


def judge(expect: str, outcome: str, mesh_open: bool) -> str:
    """What one outcome means for one expectation (see the module docstring): ``ok``, ``hole``,
    ``blocked``, ``no_listener`` or ``unknown``."""
    if outcome == ERROR:
        return UNKNOWN
    if expect == REFUSED:
        return HOLE if outcome == OPEN else OK
    if outcome == OPEN:
        return OK
    if outcome == CLOSED:
        return NO_LISTENER
    if expect == MESH or not mesh_open:
        return UNKNOWN  # the host itself did not answer: the unreachable check owns that
    return BLOCKED


def candidate_ports(policy: PolicyVersion | None, extra: Iterable[int]) -> list[int]:
    """The TCP ports every allow rule names (both ends of a range) plus ``extra``, sorted."""
    ports = {p for p in extra if 1 <= p <= 65535}
    for rule in policy.document.allow if policy is not None else ():
        for spec in rule.ports:
            try:
                parsed = parse_port(spec)
            except ValueError:
                continue
            if parsed.proto == "tcp":
                ports.update((parsed.lo, parsed.hi))
    return sorted(ports)


def expectations(policy: PolicyVersion, target: Certificate, members: Sequence[Certificate], mesh_port: int,
                 source: str, candidates: Iterable[int], *, now: float | None = None,
                 skew_s: float = 0) -> tuple[list[int], list[int]]:
    """(ports that must be refused, ports that must be reachable) to ``source`` among ``candidates`` (the
    mesh port excluded), by the ruleset ``target``'s enforcer renders for ``policy``. Raises MeshError
    when that ruleset cannot be rendered (the target is revoked by the policy, the policy is invalid)."""
    ruleset = render(policy, target, members, RenderOptions(mesh_port=mesh_port), now=now, skew_s=skew_s)
    refused: list[int] = []
    reachable: list[int] = []
    for port, verdict in ruleset.verdicts(source, "tcp", [p for p in candidates if p != mesh_port]).items():
        (reachable if verdict == "accept" else refused).append(port)
    return refused, reachable


def address_pair(target: Certificate, own: Certificate, advertised_host: str,
                 source_address: str = "") -> tuple[str, str] | None:
    """(target host, our source) of one family: the target's advertised host when its certificate lists
    it, else the certificate's first address we have a source for. Only certificate addresses are ever
    probed: a member's self-signed advertised address alone could point at anyone."""
    ours = [source_address] if source_address else list(own.addresses)
    theirs = sorted(target.addresses, key=lambda a: a != advertised_host)
    for host in theirs:
        fam = _version(host)
        if fam is None:
            continue
        for src in ours:
            if _version(src) == fam:
                return host, src
    return None


def _version(addr: str) -> int | None:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return None


def plan_round(policy: PolicyVersion | None, own: Certificate, members: Sequence[Certificate],
               advertised: Mapping[str, str], rng: random.Random, budget: ProbeBudget, *,
               held: Mapping[str, Iterable[int]] | None = None, source_address: str = "",
               now: float | None = None, skew_s: float = 0) -> list[ProbeTarget]:
    """One round's probes. ``members``: the valid, unrevoked certificates enforcement uses (the only
    members ever probed; ourselves excluded); ``advertised``: node id -> its advertised ``host:port``
    (the mesh port; a member without one is skipped); ``held``: node id -> ports with an open finding,
    re-probed until they clear. A target with open findings is preferred for one slot (in a round of
    one target, every other round), the others are a uniform sample. Without a policy: nothing."""
    if policy is None:
        return []
    held = held or {}
    by_id = {c.node_id: c for c in members if c.node_id != own.node_id}
    eligible = sorted(n for n in by_id if n in advertised)
    if not eligible:
        return []
    chosen: list[str] = []
    pending = sorted(n for n in held if n in by_id and n in advertised and held[n])
    if pending and (budget.targets > 1 or rng.random() < 0.5):
        chosen.append(rng.choice(pending))
    rest = [n for n in eligible if n not in chosen]
    chosen += rng.sample(rest, min(len(rest), budget.targets - len(chosen)))
    candidates = candidate_ports(policy, budget.extra_ports)
    out = []
    for node_id in chosen:
        target = _plan_target(policy, own, by_id[node_id], list(by_id.values()) + [own], advertised[node_id], rng,
                              budget, candidates, sorted(set(held.get(node_id, ()))), source_address, now, skew_s)
        if target is not None:
            out.append(target)
    return out


def _plan_target(policy: PolicyVersion, own: Certificate, target: Certificate, members: list[Certificate],
                 advertised: str, rng: random.Random, budget: ProbeBudget, candidates: list[int],
                 held: list[int], source_address: str, now: float | None, skew_s: float) -> ProbeTarget | None:
    try:
        host, mesh_port = split_hostport(advertised, "advertised address")
    except MeshError:
        return None
    pair = address_pair(target, own, host, source_address)
    if pair is None:
        return None
    host, source = pair
    try:
        sample = candidates if len(candidates) <= MAX_CANDIDATES else rng.sample(candidates, MAX_CANDIDATES)
        refused, reachable = expectations(policy, target, members, mesh_port, source,
                                          sorted(set(sample) | set(held)), now=now, skew_s=skew_s)
    except MeshError:
        return None
    again = [p for p in held if p != mesh_port]
    ports = [Expectation(p, REFUSED if p in refused else REACHABLE) for p in again]
    ports += [Expectation(p, REFUSED) for p in _sample(rng, [p for p in refused if p not in again], budget.refused)]
    ports += [Expectation(p, REACHABLE)
              for p in _sample(rng, [p for p in reachable if p not in again], budget.reachable)]
    ports.append(Expectation(mesh_port, MESH))
    return ProbeTarget(target.node_id, host, source, tuple(ports))


def _sample(rng: random.Random, items: list[int], k: int) -> list[int]:
    return sorted(rng.sample(items, min(k, len(items))))
