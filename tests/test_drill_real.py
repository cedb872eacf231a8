"""The chaos drill on real daemons (#15, root only): `meshsim run chaos --real` — six `meshnode` processes
in network namespaces with real nftables, 10% kernel packet loss, kill -9s, a partition, a full disk, a
flushed ruleset — must hold every invariant; and a drill in which the test breaks enforcement on purpose
behind the drill's back must FAIL, naming the invariant.  The simulator runs the same scenario in
tests/test_drill_sim.py.

Namespaces are `pmdrill<pid>-<i>` on bridge `pmdrb<pid>`, subnet 10.214.0.0/24 (see
simulations/drill/real.py); the drill removes them, its processes and its mounts when it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from simulations.drill.real import RealDrill
from simulations.scenario import from_dict

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nft", "ip", "prlimit")), reason="needs nft, ip, prlimit"),
]


def _leftovers() -> str:
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = [line for line in left.splitlines() if line.startswith(f"pmdrill{os.getpid() % 100000}-")]
    return "\n".join(mine)


def test_chaos_drill_on_real_daemons_holds_every_invariant(tmp_path):
    """`meshsim compare --real chaos`: the real drill, then the simulator on the same scenario and seed."""
    out = tmp_path / "chaos.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "compare", "--real", "chaos", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    both = json.loads(out.read_text())
    r, sim = both["real"], both["sim"]
    assert sim["mode"] == "sim" and all(v["ok"] for v in sim["invariants"].values()), sim["invariants"]
    assert sim["fault_schedule"] == r["fault_schedule"]  # one seeded schedule, both modes
    assert set(r) == set(sim), set(r) ^ set(sim)  # one report schema, both modes
    assert [set(v) for v in r["versions"]] == [set(v) for v in sim["versions"]]
    assert "simulator" in proc.stdout and "real" in proc.stdout and "kernel_holds_ruleset" in proc.stdout
    print(f"chaos --real: {took:.1f} s, kills {r['drill']['kills']}, versions {len(r['versions'])}, "
          f"t100 {r['t100_ms']} ms, kernel gaps {r['drill']['kernel_gaps']}")
    assert r["mode"] == "real" and r["nodes"] == 6
    assert all(v["ok"] for v in r["invariants"].values()), r["invariants"]
    assert r["invariant_violations"] == 0 and r["not_converged_at_end"] == 0 and r["live_nodes"] == 6
    assert r["drill"]["kills"] >= 3 and r["drill"]["restarts"] == r["drill"]["kills"]
    assert [v["converged_fraction"] for v in r["versions"]] == [1.0] * 5
    # every fault episode that alerts did, once, and resolved (the webhook saw it)
    assert r["alerts"].get("enforce.drift.trigger") == 1 and r["alerts"].get("enforce.drift.resolve") == 1
    assert r["alerts"].get("state.write_failed.trigger") == 1 and r["alerts"].get("state.write_failed.resolve") == 1
    assert "latency" in r["drill"]["not_emulated"]
    assert "fault schedule (seed 1" in proc.stderr
    assert "pmdrill" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_drill_fails_when_enforcement_is_broken_behind_its_back():
    """A planted violation: for a few seconds something outside the drill's fault schedule keeps deleting
    the node's table in one namespace (the node repairs it each time).  The kernel goes without the
    ruleset while the node's status says it enforces; the drill must FAIL and name the invariant."""
    sc = from_dict({
        "name": "planted", "duration_ms": 16_000, "seed": 2,
        "nodes": {"count": 3, "regions": ["a"]},
        "gossip": {"sync_interval_ms": 1000},
        "policy": {"rules": 5, "publish_at_ms": [2_000]},
    })
    def sabotage(drill: RealDrill) -> None:
        ns = drill.lab.ns(1)

        def loop() -> None:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "policymesh"],
                               capture_output=True, check=False)
                time.sleep(0.3)

        threading.Thread(target=loop, daemon=True).start()

    drill = RealDrill(sc, progress=False, hooks=((7_000, sabotage),))
    r = drill.run()
    failed = [name for name, v in r["invariants"].items() if not v["ok"]]
    assert "kernel_holds_ruleset" in failed, r["invariants"]
    assert any("n00001" in v for v in r["invariants"]["kernel_holds_ruleset"]["listed"])
    # the node's drift alerts fired outside any fault episode: named too
    assert "alerts_one_per_episode" in failed
    assert r["invariant_violations"] > 0
    assert not _leftovers()
