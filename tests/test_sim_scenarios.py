"""Simulation tests with fixed seeds: small and fast.  A failure message carries the seed to replay."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simulations.cli import main
from simulations.engine import replay_hint, run_scenario
from simulations.report import to_json
from simulations.scenario import ScenarioError, bundled, from_dict, load, override

pytestmark = pytest.mark.simulation


def small(name: str, nodes: int = 40, **kw):
    return override(load(name), nodes=nodes, **kw)


def check(report, converged: float = 1.0):
    hint = replay_hint(report)
    assert report["invariant_violations"] == 0, f"{hint}: {report['violations']}"
    assert report["converged_fraction"] >= converged, hint
    return report


def test_bundled_scenarios_load():
    assert {"lan", "wan-3-regions", "partition-heal", "region-outage", "authority-outage", "churn",
            "hostile"} <= set(bundled())
    for name in bundled():
        load(name)


def test_lan_small_converges_fast_under_loss():
    r, _ = run_scenario(small("lan", 60, duration_ms=50_000))
    check(r)
    assert r["t100_ms"] is not None and r["t100_ms"] < 2000, replay_hint(r)
    assert r["false_detections"] == 0, replay_hint(r)


def test_same_seed_same_report():
    sc = small("wan-3-regions", 30, duration_ms=50_000)
    a, _ = run_scenario(sc)
    b, _ = run_scenario(sc)
    a.pop("wall_s"), b.pop("wall_s")
    assert to_json(a) == to_json(b)
    c, _ = run_scenario(override(sc, seed=sc.seed + 1))
    c.pop("wall_s")
    assert to_json(c) != to_json(a)


def test_partition_heal_converges_and_the_cut_side_keeps_its_version():
    r, sim = run_scenario(small("partition-heal", 45, duration_ms=130_000))
    check(r)
    v = r["versions"][-1]
    eu = [h for h in sim.hosts[: sim.n] if sim.regions[h.region] == "eu-west"]
    cut_end = r["faults"][0]["end_ms"]
    # eu-west could only get the second version after the heal
    assert all(sim.versions[-1].applied[h.idx] >= cut_end for h in eu), replay_hint(r)
    assert v["t100_ms"] is not None


def test_region_outage_recovers_from_persisted_state():
    r, _ = run_scenario(small("region-outage", 45, duration_ms=140_000))
    check(r)


def test_authority_outage_gossip_converges_while_central_pull_waits():
    g, _ = run_scenario(small("authority-outage", 45))
    c, _ = run_scenario(small("authority-outage", 45, protocol="central-pull"))
    check(g)
    assert c["invariant_violations"] == 0, replay_hint(c)
    assert g["t100_ms"] < 5000, replay_hint(g)
    assert c["t100_ms"] is None or c["t100_ms"] > 100_000, replay_hint(c)


def test_churn_and_burst_loss():
    r, _ = run_scenario(small("churn", 40, duration_ms=130_000))
    check(r)


def test_hostile_replayers_cannot_roll_back_or_stall_the_cluster():
    r, _ = run_scenario(small("hostile", 40))
    check(r)
    assert r["hostile_nodes"] == 4
    assert r["alerts"].get("policy.stale_offer", 0) > 0, replay_hint(r)


def test_datagram_transport_with_duplication_and_reordering():
    sc = from_dict({"name": "dgram", "duration_ms": 40_000, "nodes": {"count": 30, "regions": ["a", "b"]},
                    "network": {"transport": "datagram", "loss": 0.2, "duplicate": 0.2, "reorder": 0.3},
                    "policy": {"publish_at_ms": [15_000, 20_000]}})
    check(run_scenario(sc)[0])


def test_flood_baseline_runs_in_the_same_engine():
    r, _ = run_scenario(small("lan", 40, duration_ms=50_000, protocol="flood"))
    assert r["invariant_violations"] == 0, replay_hint(r)
    assert r["dissemination_bytes_per_node"] > r["policy_bytes"]


def test_unknown_key_is_one_clear_error():
    with pytest.raises(ScenarioError, match="lozz"):
        from_dict({"name": "x", "network": {"lozz": 0.1}})
    with pytest.raises(ScenarioError, match="until_ms"):
        from_dict({"name": "x", "faults": [{"kind": "crash", "at_ms": 5, "until_ms": 1, "count": 1}]})


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[network]\nlozz = 1\n')
    assert main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lozz" in err and "Traceback" not in err
    assert main(["run", "no-such-scenario", "--quiet"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "lan", "--loss", "2"])
    assert exc.value.code == 2


def test_cli_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["run", "lan", "--nodes", "20", "--duration-ms", "45000", "--quiet", "--json", str(out),
               "--plot", str(png)])
    assert rc == 0
    rep = json.loads(out.read_text())
    for key in ("scenario", "seed", "nodes", "regions", "loss", "policy_bytes", "converged_fraction", "t50_ms",
                "t99_ms", "t100_ms", "bytes_per_node", "messages_per_node", "events", "wall_s",
                "invariant_violations"):
        assert key in rep
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_help():
    res = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--protocol" in res.stdout
