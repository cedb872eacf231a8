"""The fault schedule of a scenario: every fault as episodes on concrete nodes, drawn from the seed,
the same in the simulator and on real daemons (``meshsim run --real``), printed before a run so it
replays exactly.

The nodes a partition (by fraction or count) or a crash takes come from the ``faults`` generator,
drawn fault by fault exactly as the simulator's ``Faults`` draws them; the chaos-drill faults
(``kill9``, ``disk_full``, ``clock_skew``, ``flush_ruleset``, ``fd_pressure``) draw from their own
``drill`` generator, so a scenario without them keeps every draw it had.

``kill9`` with ``count``: that many kills at random moments of ``[at_ms, until_ms)``, each of a random
node, restarted ``restart_after_ms`` later (a kill whose node is down at that moment is skipped, in
both modes).  With ``after_publish``: the node that acknowledged each publish in the window is
killed right after its acknowledgement (chosen at run time: the publisher's choice).  The other
node faults take ``count`` nodes (default one) for ``[at_ms, until_ms)``; ``flush_ruleset`` is one
moment (another tool runs ``nft flush ruleset``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..scenario import NODE_FAULTS, Scenario

FLUSH_REPAIR_MS = 5000
"""How long after a foreign flush the node must have its ruleset back (drift repair: the daemon
watches ``nft monitor`` and repairs at once; the simulator models it as ``DRIFT_REPAIR_MS``)."""


@dataclass(frozen=True)
class Episode:
    kind: str
    name: str
    start_ms: int
    end_ms: int | None  # None: until the end of the run
    nodes: tuple[int, ...]
    regions: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self, ids: list[str]) -> str:
        end = "end" if self.end_ms is None else f"{self.end_ms} ms"
        who = ", ".join(ids[i] for i in self.nodes) if self.nodes else ", ".join(self.regions) or "-"
        extra = "".join(f" {k}={v}" for k, v in sorted(self.detail.items()))
        return f"{self.start_ms:>7} ms .. {end:<9} {self.kind:<16} {self.name:<24} {who}{extra}"

    def to_json(self, ids: list[str]) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "nodes": [ids[i] for i in self.nodes], "regions": list(self.regions), **self.detail}


def plan(sc: Scenario, n: int | None = None) -> list[Episode]:
    """Every fault of ``sc`` as episodes on the nodes ``0..n-1`` (``n``: the scenario's count)."""
    n = sc.nodes.count if n is None else n
    regions = list(sc.nodes.regions)
    faults_rng = random.Random(f"{sc.seed}:faults")  # the simulator's Faults generator, drawn the same way
    drill_rng = random.Random(f"{sc.seed}:drill")
    out: list[Episode] = []
    for f in sc.faults:
        name = f.name or f.kind
        if f.kind == "partition":
            if f.regions:
                nodes = tuple(i for i in range(n) if regions[i % len(regions)] in f.regions)
            else:
                k = f.count or int(round(f.fraction * n))
                nodes = tuple(sorted(faults_rng.sample(range(n), k)))
            out.append(Episode("partition", name, f.at_ms, f.until_ms, nodes, tuple(f.regions)))
        elif f.kind == "region_outage":
            nodes = tuple(i for i in range(n) if regions[i % len(regions)] in f.regions)
            out.append(Episode("region_outage", name, f.at_ms, f.until_ms, nodes, tuple(f.regions)))
        elif f.kind == "crash":
            k = f.count or int(round(f.fraction * n))
            out.append(Episode("crash", name, f.at_ms, f.until_ms, tuple(sorted(faults_rng.sample(range(n), k)))))
        elif f.kind in ("authority_outage", "loss"):
            detail = {"loss": f.loss} if f.kind == "loss" else {}
            out.append(Episode(f.kind, name, f.at_ms, f.until_ms, (), (), detail))
        elif f.kind in NODE_FAULTS:
            out.extend(_node_fault(f, name, n, drill_rng))
    return sorted(out, key=lambda e: (e.start_ms, e.kind, e.nodes))


def _node_fault(f: Any, name: str, n: int, rng: random.Random) -> list[Episode]:
    assert f.until_ms is not None or f.kind == "flush_ruleset"
    if f.kind == "kill9":
        if f.after_publish:  # the victims are the acknowledging nodes, known at run time
            return [Episode("kill9", name, f.at_ms, f.until_ms, (), (),
                            {"after_publish": True, "restart_after_ms": f.restart_after_ms})]
        span = max(1, f.until_ms - f.at_ms)
        kills = sorted((f.at_ms + rng.randrange(span), rng.randrange(n)) for _ in range(f.count))
        return [Episode("kill9", name, t, t + f.restart_after_ms, (victim,)) for t, victim in kills]
    nodes = tuple(sorted(rng.sample(range(n), max(1, f.count))))
    if f.kind == "flush_ruleset":
        return [Episode("flush_ruleset", name, f.at_ms, f.at_ms + FLUSH_REPAIR_MS, nodes)]
    detail: dict[str, Any] = {}
    if f.kind == "clock_skew":
        detail["skew_s"] = f.skew_s
    elif f.kind == "fd_pressure":
        detail["nofile"] = f.nofile
    return [Episode(f.kind, name, f.at_ms, f.until_ms, nodes, (), detail)]


def fault_windows(sc: Scenario) -> list[dict[str, Any]]:
    """The report's ``faults``: one window per scenario fault (as the simulator's ``Faults`` lists them)."""
    out = []
    for f in sc.faults:
        end = f.at_ms + FLUSH_REPAIR_MS if f.kind == "flush_ruleset" else f.until_ms
        out.append({"name": f.name or f.kind, "start_ms": f.at_ms,
                    "end_ms": sc.duration_ms if end is None else min(end, sc.duration_ms)})
    return out


def last_heal_ms(episodes: list[Episode], duration_ms: int) -> int:
    """When the last fault heals (the end of the run for a fault that never does)."""
    return max([duration_ms if e.end_ms is None else e.end_ms for e in episodes], default=0)


def print_schedule(episodes: list[Episode], ids: list[str], seed: int, write: Any) -> None:
    write(f"fault schedule (seed {seed}; the same seed replays it exactly):\n")
    for e in episodes:
        write(f"  {e.describe(ids)}\n")
    if not episodes:
        write("  (no faults)\n")
