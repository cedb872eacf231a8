"""Scale machinery of the simulator: overlays over a shared converged directory behave like the plain
columns they replace, the `internet` scenario runs (scaled down) and converges, and `meshsim sweep`
runs its cases in parallel into one table.  Small and fast; no timing asserts."""

from __future__ import annotations

import csv
import json
import random
from itertools import compress

import pytest

from protocol.entropy import Entropy
from protocol.gossip.broadcast_tree import _neighbours as tree_sides
from protocol.gossip.broadcast_tree import _RankedRing
from protocol.gossip.directory import table_certificates, table_member_entries
from protocol.gossip.member_base import DirectoryView, OverlayColumn, OverlayIntSet
from protocol.gossip.members import IntSet
from simulations import sweep
from simulations.baselines import ln_floor_ms, serf_model_ms
from simulations.cli import main
from simulations.engine import Simulation
from simulations.scenario import load, override


@pytest.mark.parametrize("trial", range(40))
def test_overlay_intset_is_an_intset(trial: int) -> None:
    """The same adds and discards give the same members at the same positions, and the same draws."""
    r = random.Random(trial)
    base = IntSet()
    for i in r.sample(range(120), r.randrange(0, 80)):
        base.add(i)
    before = list(base)
    plain = IntSet()
    for i in base:
        plain.add(i)
    over = OverlayIntSet(base)
    for _ in range(300):
        i = r.randrange(130)
        if r.random() < 0.5:
            plain.add(i)
            over.add(i)
        else:
            plain.discard(i)
            over.discard(i)
        assert list(over) == list(plain) and len(over) == len(plain)
        assert [over.items[k] for k in range(len(over))] == list(plain.items)
        assert all((k in over) == (k in plain) for k in range(135))
        bp = base._pos
        differ = {k: p for k in range(135)
                  if (p := over._pos(k)) != (bp[k] if k < len(bp) else -1)}
        assert dict(over.moved()) == differ and over.moved_count() == len(differ)
    if len(plain):
        a, b = Entropy(random.Random(trial)), Entropy(random.Random(trial))
        assert [over.choice(a) for _ in range(20)] == [plain.choice(b) for _ in range(20)]
    assert list(base) == before  # the shared base is never written


def test_overlay_column_reads_through_and_drops_writes_of_the_base_value() -> None:
    base = [None, "a", "b"]
    col: OverlayColumn[str | None] = OverlayColumn(base, None)
    col[1] = "x"
    col.extend([None, None])
    col[4] = "y"
    assert list(col) == [None, "x", "b", None, "y"] and len(col) == 5
    col[1] = "a"  # back to the base's own value: nothing of this node's is kept
    assert col.over == {4: "y"}
    with pytest.raises(IndexError):
        col[5]
    assert base == [None, "a", "b"]


def test_directory_views_compare_without_building_dicts() -> None:
    base = {f"n{i}": object() for i in range(5)}
    a = DirectoryView(base, {}, frozenset({"n1"}))  # type: ignore[arg-type]
    b = DirectoryView(base, {}, frozenset({"n1"}))  # type: ignore[arg-type]
    assert a == b and a != DirectoryView(base, {}, frozenset())  # type: ignore[arg-type]
    assert a == {k: v for k, v in base.items() if k != "n1"} and a != base
    assert DirectoryView({}, {"n9": base["n0"]}, frozenset()) != a  # type: ignore[arg-type]


def _converged_sim(nodes: int) -> Simulation:
    sc = override(load("internet"), nodes=nodes)
    return Simulation(sc)


def test_internet_scaled_down_converges_without_violations() -> None:
    sc = override(load("internet"), nodes=60)
    sim = Simulation(sc)
    report = sim.run()
    assert report["invariant_violations"] == 0, report["violations"]
    assert report["converged_fraction"] == 1.0
    assert all(v["t100_ms"] is not None for v in report["versions"])
    assert sim.converged_base is not None


def test_tables_over_a_base_answer_like_plain_tables() -> None:
    """After a run with joins, leaves and crashes, each node's overlay table gives the directory, the
    member file and the sync entries that plain columns holding the same entries would give."""
    sim = _converged_sim(50)
    sim.kernel.run_until(sim.sc.duration_ms)
    checked, churn = 0, set()
    for proc in sim.kernel.procs[: sim.n]:
        table = getattr(proc, "members", None)
        if table is None or table.base is None:
            continue
        recs, codes = list(table.recs), list(table.liveness_codes)
        assert [r is not None for r in recs] == [c != 0 for c in codes]
        present = list(compress(recs, codes))
        certs, _ = table_certificates(table)
        assert isinstance(certs, DirectoryView)
        assert dict(certs) == {r.node_id: r.cert for r in present}
        assert len(certs) == len(present) == table.count
        assert list(table_member_entries(table)) == [r.entry for r in present if r.idx != table.me_index]
        for b in range(len(table.digest.bucket_ids)):
            assert table.bucket_entries(b) == tuple(
                (r.node_id, r.incarnation) for i in table.digest.bucket_ids[b] if i < len(recs) and (r := recs[i]))
        assert sorted(table.alive_all) == sorted(
            i for i, c in enumerate(codes) if c == 1 and i != table.me_index)
        mine = table.alive.get(table.region)
        ring = sorted([table.ids[i] for i in mine] + [table.me])  # the broadcast tree, by definition
        assert _RankedRing.over_base(table, mine) is not None
        for degree in (2, 3, 5):
            table.tree_memo = None
            tree, roots = tree_sides(table, degree)
            pos = ring.index(table.me)
            want = ([ring[(pos - 1) // degree]] if pos else []) + ring[degree * pos + 1:degree * pos + 1 + degree]
            assert tree == want
            assert bool(roots) == (pos == 0)
        if table.count > table.base.count:
            churn.add("join")
        if 4 in codes:  # LEFT_CODE
            churn.add("leave")
        if any(c in (2, 3) for c in codes):  # SUSPECT_CODE, DEAD_CODE: the crashed node
            churn.add("crash")
        checked += 1
    assert checked > 40
    assert churn == {"join", "leave", "crash"}


@pytest.mark.parametrize("trial", range(20))
def test_ranked_ring_is_the_sorted_ring(trial: int) -> None:
    """The broadcast tree's ring over a shared base (ranks by bisection) is the sorted list."""
    rng = random.Random(trial)
    base = sorted(f"n{rng.randrange(10**6):06d}" for _ in range(rng.randrange(1, 300)))
    base = sorted(set(base))
    removed = sorted(rng.sample(base, rng.randrange(0, min(20, len(base)))))
    added = sorted({f"m{rng.randrange(10**6):06d}" for _ in range(rng.randrange(0, 20))})
    ring = sorted((set(base) - set(removed)) | set(added))
    rr = _RankedRing(base, removed, added)
    assert len(rr) == len(ring)
    assert [rr.at(r) for r in range(len(ring))] == ring
    assert [rr.rank(x) for x in ring] == list(range(len(ring)))


def test_serf_model_and_floor() -> None:
    assert serf_model_ms(1000, 0.1) == 2400  # the report's fixed anchor is 2,390 ms
    sizes = [12, 100, 1000, 10_000, 100_000]
    assert [serf_model_ms(n, 0.1) for n in sizes] == sorted(serf_model_ms(n, 0.1) for n in sizes)
    assert serf_model_ms(1000, 0.0) <= serf_model_ms(1000, 0.1)
    assert ln_floor_ms(1000, 0.1, 0.25) < serf_model_ms(1000, 0.1)


def test_sweep_runs_every_case_in_parallel_into_one_table(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    code = main(["sweep", "loopback-12", "--seeds", "1,2", "--loss", "0,0.1", "--protocols", "gossip,flood",
                 "--workers", "2", "--quiet", "--json", str(out / "s.json"), "--csv", str(out / "s.csv")])
    assert code == 0
    rows = json.loads((out / "s.json").read_text())
    assert [(r["protocol"], r["loss"], r["seed"]) for r in rows] == [
        (p, loss, s) for p in ("gossip", "flood") for loss in (0.0, 0.1) for s in (1, 2)]
    assert all(r["nodes"] == 12 and r["t100_ms"] is not None and r["serf_model_ms"] for r in rows)
    with open(out / "s.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # the same case in this process gives the same row (runs are deterministic)
    again = sweep.run_case(sweep.cases("loopback-12", [2], [0.1], [None], ["flood"])[0])
    assert {k: again[k] for k in ("t50_ms", "t100_ms", "bytes_per_node")} == \
        {k: rows[-1][k] for k in ("t50_ms", "t100_ms", "bytes_per_node")}


def test_sweep_on_a_local_dask_cluster_gives_the_same_rows_as_the_process_pool(tmp_path: object) -> None:
    """The distributed backend (``--scheduler``) runs the same cases into the same table: tested here
    with a real local Dask cluster of two worker processes, compared with the process pool."""
    pytest.importorskip("distributed")
    from pathlib import Path

    out = Path(str(tmp_path))
    base = ["sweep", "loopback-12", "--seeds", "3,4", "--loss", "0.1", "--protocols", "gossip,flood",
            "--workers", "2", "--quiet"]
    assert main([*base, "--scheduler", "local", "--json", str(out / "dask.json")]) == 0
    assert main([*base, "--json", str(out / "pool.json")]) == 0
    on_dask = json.loads((out / "dask.json").read_text())
    in_pool = json.loads((out / "pool.json").read_text())
    machine = {"wall_s", "max_rss_mb"}  # where and how fast it ran, not what it found
    assert [(r["protocol"], r["seed"]) for r in on_dask] == [(p, s) for p in ("gossip", "flood") for s in (3, 4)]
    assert [{k: v for k, v in r.items() if k not in machine} for r in on_dask] == \
        [{k: v for k, v in r.items() if k not in machine} for r in in_pool]


def test_sweep_names_an_unreachable_scheduler_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("distributed")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["sweep", "loopback-12", "--quiet", "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert code == 2
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in capsys.readouterr().err


def test_sweep_refuses_a_bad_list_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "lan", "--protocols", "gossip,carrier-pigeon"])
    assert exc.value.code == 2
    assert "carrier-pigeon" in capsys.readouterr().err


def test_a_node_joining_after_a_publish_counts_from_its_join_not_from_the_publish() -> None:
    """The internet scenario's joiners arrive 6-14 s into the run, from the first publish (6 s) on: the
    first version's t100 is how long the nodes that existed took, and each joiner's own delay is
    measured from its join (it could not have had the version before it existed)."""
    from simulations.engine import run_scenario

    sc = override(load("internet"), nodes=300)
    report, sim = run_scenario(sc)
    first = report["versions"][0]
    v = sim.versions[0]
    pub = v.published_at
    assert pub is not None
    joiners = [h for h in sim.hosts[: sim.n] if h.joined_ms is not None and h.joined_ms > pub and h.idx in v.applied]
    assert joiners, "the scenario should have nodes joining after the first publish"
    late_join = max(h.joined_ms - pub for h in joiners if h.joined_ms is not None)
    # the version reached everyone, and its t100 is not the last joiner's arrival
    assert first["t100_ms"] is not None
    assert first["t100_ms"] < late_join + min(v.applied[h.idx] - (h.joined_ms or 0) for h in joiners)
    for h in joiners:
        assert h.joined_ms is not None and v.applied[h.idx] >= h.joined_ms


def test_the_report_names_each_versions_slowest_nodes_and_why() -> None:
    """Each version lists its slowest nodes (the first is the one t100 measures), slowest first, and
    says which joined or restarted after the publish; the summary prints them."""
    from simulations.cli import _summary
    from simulations.engine import run_scenario

    report, sim = run_scenario(override(load("churn"), nodes=30))
    last = report["versions"][-1]
    slow = last["slowest"]
    assert len(slow) == 3 and slow[0]["ms"] == last["t100_ms"]
    assert [x["ms"] for x in slow] == sorted((x["ms"] for x in slow), reverse=True)
    by_id = {h.node_id: h for h in sim.hosts}
    pub = sim.versions[-1].published_at
    assert pub is not None
    for x in slow:
        h = by_id[x["node"]]
        assert sim.regions[h.region] == x["region"]
        assert ("restarted_ms" in x) == (h.started_ms > pub and "joined_ms" not in x)
    # the churn scenario's second crash wave restarts nodes after the last publish: they are the slowest
    assert all("restarted_ms" in x for x in slow)
    assert f"slowest: {slow[0]['node']} {slow[0]['region']} {slow[0]['ms']} ms (restarted at" in _summary(report)

    report, _ = run_scenario(override(load("internet"), nodes=300))
    firsts = report["versions"][0]["slowest"]
    assert firsts[0]["ms"] == report["versions"][0]["t100_ms"]


def test_each_versions_bytes_are_broken_down_by_message_kind() -> None:
    """``bytes_by_kind`` adds up to ``bytes_per_node`` (the same window), its dissemination kinds to
    ``dissemination_bytes_per_node``, largest first."""
    from simulations.engine import run_scenario

    report, _ = run_scenario(override(load("internet"), nodes=300))
    for v in report["versions"]:
        kinds = v["bytes_by_kind"]
        assert abs(sum(kinds.values()) - v["bytes_per_node"]) < 0.1 * len(kinds) + 0.2
        diss = sum(b for k, b in kinds.items() if k in ("announce", "policy_pull", "policy_push", "root_pull", "root_push"))
        assert abs(diss - v["dissemination_bytes_per_node"]) < 0.1 * len(kinds) + 0.2
        assert list(kinds.values()) == sorted(kinds.values(), reverse=True)
        assert kinds["policy_push"] >= report["policy_bytes"] * 0.9  # every node received the body about once
