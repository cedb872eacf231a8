"""The chaos drill in the simulator (#15): the seeded fault schedule, the new node faults, the drill
invariants, and the checker catching a planted violation.  The same scenarios run on real daemons in
tests/test_drill_real.py."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main
from simulations.drill.checks import INVARIANTS, DrillChecks, Sample
from simulations.drill.real import DrillError, preflight
from simulations.drill.schedule import Episode, plan
from simulations.engine import run_scenario
from simulations.report import DRILL_KEYS
from simulations.scenario import ScenarioError, from_dict, load, override

pytestmark = pytest.mark.simulation


def _failed(report: dict) -> list[str]:
    return [name for name, r in report["invariants"].items() if not r["ok"]]


def test_chaos_scenario_holds_every_invariant_in_the_simulator():
    report, sim = run_scenario(load("chaos"))
    assert report["mode"] == "sim" and set(DRILL_KEYS) <= report.keys()
    assert _failed(report) == [] and report["invariant_violations"] == 0, report["violations"]
    assert set(report["invariants"]) == set(INVARIANTS)
    assert report["drill"]["kills"] == 4  # three at random moments, one right after an acknowledgement
    assert report["not_converged_at_end"] == 0
    alerts = sim.drill.checks.alerts
    assert [(a[2], a[3]) for a in alerts] == [("state.write_failed", "trigger"), ("state.write_failed", "resolve"),
                                             ("enforce.drift", "trigger"), ("enforce.drift", "resolve")]
    assert report["drill"]["kernel_gaps"] and all(g["to_ms"] > g["from_ms"] for g in report["drill"]["kernel_gaps"])
    assert any("right after it acknowledged" in t["action"] for t in report["fault_timeline"])


def test_the_schedule_is_seeded_and_replays_exactly(capsys):
    sc = load("chaos")
    assert plan(sc) == plan(sc)
    assert plan(sc) != plan(override(sc, seed=2))
    a, _ = run_scenario(sc)
    b, _ = run_scenario(sc)
    a.pop("wall_s")
    b.pop("wall_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert main(["run", "chaos", "--json", "-"]) == 0
    err = capsys.readouterr().err
    assert "fault schedule (seed 1" in err and "disk_full" in err and "kill -9 after ack" in err


def test_the_plan_draws_partitions_and_crashes_as_the_simulator_does():
    """Real mode executes plan(); the simulator draws the older fault kinds itself: the same nodes."""
    sc = from_dict({"name": "draws", "duration_ms": 40_000, "seed": 11, "nodes": {"count": 20},
                    "policy": {"publish_at_ms": [10_000]},
                    "faults": [{"kind": "partition", "fraction": 0.3, "at_ms": 12_000, "until_ms": 20_000},
                               {"kind": "crash", "count": 3, "at_ms": 14_000, "until_ms": 25_000}]})
    _, sim = run_scenario(sc)
    part, crash = (next(e for e in plan(sc) if e.kind == k) for k in ("partition", "crash"))
    assert tuple(i for i in range(sim.n) if sim.net.cuts[0].side[i]) == part.nodes
    assert tuple(sorted(sim.faults._crashed_serial)) == crash.nodes


def test_long_drill_with_skew_and_descriptor_pressure_holds_in_the_simulator():
    report, sim = run_scenario(load("chaos-long"))
    assert _failed(report) == [] and report["invariant_violations"] == 0, report["violations"]
    kinds = {e["kind"] for e in report["fault_schedule"]}
    assert {"kill9", "partition", "clock_skew", "region_outage", "disk_full", "fd_pressure", "flush_ruleset"} <= kinds
    assert report["drill"]["restarts"] == 2  # the clock-skew restarts (into and out of the skew)


def test_descriptor_pressure_refuses_connections_in_the_model():
    sc = from_dict({"name": "fd", "duration_ms": 30_000, "nodes": {"count": 12},
                    "policy": {"publish_at_ms": [20_000]},
                    "faults": [{"kind": "fd_pressure", "nofile": 42, "at_ms": 1, "until_ms": 15_000}]})
    report, sim = run_scenario(sc)
    assert _failed(report) == [], report["violations"]  # healed at 15 s: it converges after
    assert not sim.net.conn_cap  # the cap ended with the fault


def test_checker_catches_a_planted_violation_a_node_killed_while_its_disk_is_full():
    """The drill is only worth its pass if it fails when it should: a node whose disk is full cannot
    persist the version it enforces; kill -9 it and it comes back on the older one."""
    sc = from_dict({
        "name": "planted", "duration_ms": 40_000, "seed": 3, "nodes": {"count": 5},
        "policy": {"publish_at_ms": [5_000, 12_000]},
        "faults": [{"kind": "disk_full", "at_ms": 8_000, "until_ms": 30_000},
                   {"kind": "kill9", "at_ms": 16_000, "until_ms": 16_001, "count": 1}],
    })
    disk_node = next(e for e in plan(sc) if e.kind == "disk_full").nodes[0]
    victim = next(e for e in plan(sc) if e.kind == "kill9").nodes[0]
    if victim != disk_node:  # aim the kill at the full disk (the draw is seeded; find a seed that does)
        for seed in range(4, 200):
            cand = override(sc, seed=seed)
            p = plan(cand)
            if next(e for e in p if e.kind == "kill9").nodes == next(e for e in p if e.kind == "disk_full").nodes:
                sc = cand
                break
    report, _ = run_scenario(sc)
    assert "enforced_version_monotonic" in _failed(report), report["invariants"]
    assert report["invariant_violations"] > 0


def test_checks_flag_each_invariant_from_observations():
    ep = [Episode("flush_ruleset", "flush", 1000, 6000, (0,))]
    c = DrillChecks(["a", "b"], ep, seed=9)
    c.sample(0, 0, Sample(True, (1, 2), "h2", "h2"))
    c.acknowledged(10, 1, 3)
    c.sample(20, 1, Sample(True, (1, 2), "h2", "h2"))  # acknowledged 3, enforces 2
    c.sample(30, 0, Sample(True, (1, 1), "h1", "h1"))  # went back
    c.sample(1200, 0, Sample(True, (1, 2), "h2", None))  # inside the flush episode: allowed
    c.sample(9000, 0, Sample(True, (1, 2), "h2", None))  # outside: a violation
    for t in (9100, 12_500, 13_000):
        c.sample(t, 1, Sample(True, (1, 3), "h3", "other"))  # status claims h3 for > 3 s, kernel differs
    c.kernel_gap(20_000, 20_050, 1)  # no flush episode on b
    c.alert(1100, 0, "enforce.drift", "trigger")  # no resolve
    out = c.finish(30_000, [0, 1], {0: (1, 2), 1: (1, 3)}, last_serial=3, heal_ms=6000)
    assert {n for n, r in out.items() if not r["ok"]} == set(INVARIANTS)
    assert all("seed=9" in v for r in out.values() for v in r["listed"])


def test_node_fault_validation():
    base = {"name": "x", "nodes": {"count": 3}}
    for fault, words in [
        ({"kind": "kill9", "at_ms": 1, "until_ms": 5}, "count >= 1"),
        ({"kind": "disk_full", "at_ms": 1}, "until_ms"),
        ({"kind": "clock_skew", "at_ms": 1, "until_ms": 5}, "skew_s"),
        ({"kind": "fd_pressure", "at_ms": 1, "until_ms": 5, "nofile": 3}, "nofile"),
        ({"kind": "kill9", "at_ms": 1, "until_ms": 5, "count": 9}, "count must be"),
    ]:
        with pytest.raises(ScenarioError, match=words):
            from_dict({**base, "faults": [fault]})


def test_real_mode_needs_root_with_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(DrillError, match="needs root"):
        preflight(load("chaos"))
    assert main(["run", "chaos", "--real", "--quiet"]) == 2
    assert "meshsim: error: --real needs root" in capsys.readouterr().err
