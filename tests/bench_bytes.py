"""Bytes received per node, by kind (not a test of behaviour): the figures of the README's "Idle traffic
and bytes per version" table.

    .venv/bin/python tests/bench_bytes.py [--scenario internet] [--nodes 1000] [--seed S] [--duration-ms MS]
                                          [--json FILE]

Runs one scenario in the simulator and decodes every frame delivered to a node of the fleet (the frames
the report's ``bytes_per_node`` counts): each one's wire bytes (``Network.wire_bytes``: framing and
TCP/IP headers included) go to its kind; the gossip items a probe, ack or announce carries are counted
apart from it, at their encoded size (the carrier keeps the rest, headers included).  A member record
or status item is "already held" when the receiver held that member's record at the same incarnation
(status: the same sequence number) before the frame arrived.  Windows: ``idle`` (per second, from the
idle snapshot to the first publish), each version (from its publish until every live node applied it,
the report's window), and the whole run.  Figures are per node (bytes / nodes).  Scenarios on the tcp
transport only (the bundled ones).
"""

from __future__ import annotations

import argparse
import json
import typing
from collections import Counter
from typing import Any

from protocol.gossip import wire as W
from simulations.engine import Simulation
from simulations.scenario import load, override

_BODIES = (W.PolicyPush, W.PolicyPull, W.RootPull, W.RootPush)
_SYNC = (W.Sync, W.SyncEntries, W.MemberPull, W.Members)
_PROBES = (W.Ping, W.Ack, W.PingReq, W.Nack)
_ITEM_TYPES = typing.get_args(W.GossipItem)
_REF = getattr(W, "AliveRef", None)  # compact member records (absent before they existed)

ROWS = ("policy bodies and pull requests", "announces", "member records on probes and acks",
        "  records already held", "  records without certificate", "signed statuses on probes and acks",
        "  statuses already held", "suspicions and deaths on probes and acks", "probes and acks themselves",
        "anti-entropy (syncs, entries, a joiner's directory)", "other", "total")


class KindCounter:
    """Wraps the simulation's ``Measurement.frame_received``: per-row byte counters, snapshotted at the
    windows' ends."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.bytes: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.snaps: dict[str, Counter[str]] = {}
        self.snap_t: dict[str, int] = {}
        m = sim.measure
        orig_frame, orig_pub, orig_conv = m.frame_received, m.published, m.converged

        def frame_received(i: int, data: bytes) -> None:
            orig_frame(i, data)
            if "idle" not in self.snaps and m.idle_snap is not None:  # (scheduled before we wrapped it)
                self.snap("idle")
                self.snap_t["idle"] = m.idle_snap_t
            if i < sim.n:
                self.count(i, data)

        def published(v: Any) -> None:
            orig_pub(v)
            self.snap(f"publish {v.serial}")

        def converged(h: Any) -> None:
            done = {v.serial for v in sim.versions if v.done_ms is not None}
            orig_conv(h)
            for v in sim.versions:
                if v.done_ms is not None and v.serial not in done:
                    self.snap(f"done {v.serial}")

        m.frame_received = frame_received  # type: ignore[method-assign]
        m.published = published  # type: ignore[method-assign]
        m.converged = converged  # type: ignore[method-assign]
        sim.kernel.on_frame = frame_received

    def snap(self, name: str) -> None:
        self.snaps[name] = Counter(self.bytes)
        self.snap_t[name] = self.sim.kernel.now

    def count(self, i: int, data: bytes) -> None:
        b = self.bytes
        total = self.sim.net.wire_bytes(len(data))
        b["total"] += total
        try:
            msg = W.decode(data)
        except Exception:  # noqa: BLE001 - a baseline's frame or a hostile node's garbage
            b["other"] += total
            return
        if isinstance(msg, _BODIES):
            b["policy bodies and pull requests"] += total
            return
        if isinstance(msg, _SYNC):
            b["anti-entropy (syncs, entries, a joiner's directory)"] += total
            return
        rest = total
        proc = self.sim.kernel.procs[i]
        table = getattr(proc, "members", None)
        for item in getattr(msg, "gossip", ()):
            size = len(W.encode(item))
            rest -= size
            if isinstance(item, W.Alive):
                row = "member records on probes and acks"
                b[row] += size
                self.items["records"] += 1
                if table is not None and _held_record(table, item):
                    b["  records already held"] += size
            elif _REF is not None and isinstance(item, _REF):
                b["member records on probes and acks"] += size
                b["  records without certificate"] += size
                self.items["records"] += 1
                self.items["records without certificate"] += 1
                r = table.rec(item.node_id) if table is not None else None
                if r is not None and r.incarnation == item.incarnation:
                    b["  records already held"] += size
            elif isinstance(item, W.Status):
                b["signed statuses on probes and acks"] += size
                self.items["statuses"] += 1
                if table is not None and _held_status(table, item):
                    b["  statuses already held"] += size
            elif isinstance(item, _ITEM_TYPES):
                b["suspicions and deaths on probes and acks"] += size
        if isinstance(msg, W.Announce):
            b["announces"] += rest
        elif isinstance(msg, _PROBES):
            b["probes and acks themselves"] += rest
        else:
            b["other"] += rest


def _held_record(table: Any, item: W.Alive) -> bool:
    try:
        env = W.decode_payload(_envelope_payload(item.record))
    except Exception:  # noqa: BLE001
        return False
    r = table.rec(getattr(env, "node_id", ""))
    return r is not None and r.record == item.record


def _envelope_payload(data: bytes) -> bytes:
    from protocol.trust.signing import decode_envelope
    return decode_envelope(data, "member").payload


def _held_status(table: Any, item: W.Status) -> bool:
    try:
        body = W.decode_payload(item.payload)
    except Exception:  # noqa: BLE001
        return False
    i = table.index_of(getattr(body, "node_id", ""))
    st = table.statuses[i] if i is not None else None
    return st is not None and st.body.seq == body.seq


def measure(scenario: str, nodes: int | None, seed: int | None, duration_ms: int | None = None) -> dict[str, Any]:
    sc = load(scenario)
    sc = override(sc, nodes=nodes, seed=seed, duration_ms=duration_ms)
    if sc.network.transport != "tcp":  # datagrams are counted as they arrive, not as decoded frames
        raise ValueError(f"{scenario}: only the tcp transport is decoded here, not {sc.network.transport!r}")
    sim = Simulation(sc)
    kc = KindCounter(sim)
    report = sim.run()
    n = sim.n
    windows: dict[str, Any] = {}
    if "idle" in kc.snaps and sim.versions and f"publish {sim.versions[0].serial}" in kc.snaps:
        pub = f"publish {sim.versions[0].serial}"
        dt = (kc.snap_t[pub] - kc.snap_t["idle"]) / 1000
        windows["idle B/s"] = _table(kc.snaps[pub] - kc.snaps["idle"], n * dt)
    for v in sim.versions:
        a, z = f"publish {v.serial}", f"done {v.serial}"
        if a in kc.snaps:
            end = kc.snaps.get(z, kc.bytes)
            windows[f"version {v.serial} B"] = _table(end - kc.snaps[a], n)
    windows["run B"] = _table(kc.bytes, n)
    keys = ("nodes", "policy_bytes", "bytes_budget_per_node", "bytes_per_node", "idle_bytes_per_node_s",
            "t100_ms", "t99_ms", "run_bytes_per_node", "invariant_violations", "wall_s")
    counters: Counter[str] = Counter()
    for proc in sim.kernel.procs:
        membership = getattr(proc, "membership", None)
        if membership is not None:
            counters.update({k: v for k, v in membership.counters.items()
                             if k.startswith("record") or k in ("refutations", "absurd_incarnations")})
        conduct = getattr(proc, "conduct", None)
        if conduct is not None:
            counters["misbehaviour_disconnects"] += conduct.disconnects
    return {"report": {k: report.get(k) for k in keys}, "counters_summed": dict(sorted(counters.items())),
            "versions": [{k: v.get(k) for k in ("serial", "t100_ms", "bytes_per_node")} for v in report["versions"]],
            "items_received_run": dict(kc.items), "per_node": windows}


def _table(c: Counter[str], div: float) -> dict[str, float]:
    return {row: round(c.get(row, 0) / div, 1) for row in ROWS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="internet")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--duration-ms", type=int, default=None, help="run longer: queued rumours drain")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = measure(a.scenario, a.nodes, a.seed, a.duration_ms)
    print(json.dumps(out["report"]))
    print(json.dumps(out["versions"]))
    print("items received over the run:", out["items_received_run"])
    print("counters, summed over the nodes up at the end:", out["counters_summed"])
    cols = list(out["per_node"])
    print(f"{'':56}" + "".join(f"{c:>14}" for c in cols))
    for row in out["per_node"][cols[0]]:
        print(f"{row:56}" + "".join(f"{out['per_node'][c][row]:>14,.1f}" for c in cols))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
