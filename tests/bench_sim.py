"""Simulator speed benchmark (not a test of behaviour): prints figures and a ratio against a baseline
measured in the same run.

    .venv/bin/python tests/bench_sim.py [--nodes 1000] [--duration-ms 60000] [--scenario lan]
    .venv/bin/python tests/bench_sim.py --nodes 10000     (10k nodes: about 50 minutes, 13 GB)
    .venv/bin/pytest -m bench tests/bench_sim.py -s

The baseline is the bare event loop of the same kernel (heap push/pop of the same number of events,
no protocol work), so the ratio says how much of the wall time the protocol and network model cost.
"""

from __future__ import annotations

import argparse
import heapq
import resource
import time

import pytest

from simulations.engine import run_scenario
from simulations.kernel import SEQ_BITS
from simulations.scenario import load, override


def bare_loop(events: int) -> float:
    t0 = time.perf_counter()
    heap: list[tuple[int, int, int, None]] = []
    for i in range(events):
        heapq.heappush(heap, ((i * 7 % 1000) << SEQ_BITS | i, i % 1000, 0, None))  # the kernel's entry shape
        if len(heap) > 5000:
            heapq.heappop(heap)
    while heap:
        heapq.heappop(heap)
    return time.perf_counter() - t0


def bench(scenario: str = "lan", nodes: int = 1000, duration_ms: int = 60_000) -> dict[str, float]:
    sc = override(load(scenario), nodes=nodes, duration_ms=duration_ms)
    t0 = time.perf_counter()
    report, _ = run_scenario(sc)
    total = time.perf_counter() - t0
    base = bare_loop(report["events"])
    out = {
        "nodes": nodes, "virtual_s": duration_ms / 1000, "wall_s": round(total, 2), "sim_wall_s": report["wall_s"],
        "events": report["events"], "events_per_s": round(report["events"] / report["wall_s"]),
        "bare_loop_s": round(base, 3), "ratio_vs_bare_loop": round(report["wall_s"] / base, 1),
        "virtual_per_wall": round(duration_ms / 1000 / report["wall_s"], 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # every node holds every member: the n^2 part of the memory, per (node, member) pair
        "rss_bytes_per_pair": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / nodes ** 2),
        "t100_ms": report["t100_ms"],
    }
    for k, v in out.items():
        print(f"{k:>20}: {v}")
    return out


@pytest.mark.bench
def test_bench_sim_1000_nodes():
    bench()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="lan")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--duration-ms", type=int, default=60_000)
    a = ap.parse_args()
    bench(a.scenario, a.nodes, a.duration_ms)
