"""Pinned simulator reports: for fixed seeds, `meshsim run` reports stay byte-identical (apart from
`wall_s`) across refactors of the simulator and the core. A change of protocol *behaviour* is meant to
change them: re-pin deliberately with `PIN_SIM_REPORTS=1 pytest tests/test_sim_pinned.py` and say why in
the commit."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from simulations.engine import run_scenario
from simulations.report import DRILL_KEYS
from simulations.scenario import load, override

GOLDEN = Path(__file__).resolve().parent / "golden" / "sim_reports.json"
# (scenario, nodes, seed, loss, duration_ms, protocol): small, but every fault kind the bundled
# scenarios exercise, and all three protocols
CASES: list[tuple[str, int, int, float | None, int | None, str]] = [
    ("loopback-12", 12, 1, None, None, "gossip"),
    ("lan", 40, 7, 0.1, 45_000, "gossip"),
    ("wan-3-regions", 30, 3, None, 50_000, "gossip"),
    ("partition-heal", 30, 5, None, None, "gossip"),
    ("region-outage", 30, 2, None, None, "gossip"),
    ("churn", 30, 4, None, None, "gossip"),
    ("authority-outage", 24, 6, None, None, "gossip"),
    ("hostile", 40, 1, None, None, "gossip"),
    ("wan-3-regions", 30, 3, None, 50_000, "central-pull"),
    ("wan-3-regions", 30, 3, None, 50_000, "flood"),
]


def _case_id(case: tuple[Any, ...]) -> str:
    name, nodes, seed, loss, dur, proto = case
    return f"{name}-n{nodes}-s{seed}-l{loss}-d{dur}-{proto}"


def _digest(case: tuple[Any, ...]) -> str:
    name, nodes, seed, loss, dur, proto = case
    sc = override(load(name), nodes=nodes, seed=seed, loss=loss, duration_ms=dur, protocol=proto)
    report, _ = run_scenario(sc, progress=False)
    report.pop("wall_s", None)
    for key in DRILL_KEYS:  # the chaos drill's additions; its checks still count in invariant_violations
        report.pop(key, None)
    return hashlib.sha256(json.dumps(report, sort_keys=True, default=str).encode()).hexdigest()


@pytest.mark.simulation
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_report_is_pinned(case: tuple[Any, ...]) -> None:
    got = _digest(case)
    pinned: dict[str, str] = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    key = _case_id(case)
    if os.environ.get("PIN_SIM_REPORTS") == "1":
        pinned[key] = got
        GOLDEN.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        return
    assert key in pinned, f"no pinned report for {key}: run with PIN_SIM_REPORTS=1"
    assert got == pinned[key], f"{key}: the report changed (seed replay differs)"
