"""The simulator's host-cost knobs (calibrated against real processes) shift convergence as modelled."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from simulations.engine import Simulation
from simulations.scenario import load

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "scenarios" / "loopback-12.toml"


def run(process_ms: float, apply_ms: int) -> dict:
    sc = load(str(SCENARIO))
    sc = msgspec.structs.replace(sc, nodes=msgspec.structs.replace(sc.nodes, process_ms=process_ms,
                                                                   apply_ms=apply_ms))
    return Simulation(sc).run()


@pytest.mark.simulation
def test_host_costs_delay_convergence_and_keep_invariants():
    bare = run(0, 0)
    costly = run(5, 10)
    for r in (bare, costly):
        assert r["converged_fraction"] == 1.0 and r["invariant_violations"] == 0
    # Every version now needs at least the apply time more, and per-message processing on top.
    for b, c in zip(bare["versions"], costly["versions"], strict=True):
        assert c["t100_ms"] >= b["t100_ms"] + 10
    assert costly["t100_ms"] > bare["t100_ms"] + 10
