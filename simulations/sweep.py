"""``meshsim sweep``: one scenario over seeds x loss x sizes x protocols, on this machine's cores.

Runs are independent and deterministic (each is ``run_scenario`` of one overridden scenario), so
they go to a ``concurrent.futures.ProcessPoolExecutor`` (``--workers``, default: every core) and the
table comes out in case order whatever order they finish in.  One row per run: the case, the
convergence times of the last version, bytes, idle traffic, wall time and peak memory of the worker
(``ru_maxrss`` after the run: the largest run a worker did so far), and the Serf/memberlist model's
figure at that size and loss (``serf_model_ms``).  Output: a table on stdout, ``--json`` / ``--csv``,
and ``--plot`` (t100 against N per protocol, the median over seeds, with the Serf model and the
ln N floor drawn in).

Where a sweep outgrows one machine it runs on a Dask distributed cluster instead (``--scheduler
tcp://HOST:8786``: the optional ``cluster`` extra, ``pip install 'policymesh[cluster]'``, on this machine
and on every worker, which must have the same version of this package installed): the same cases, the
same rows in the same order.  ``--scheduler local`` starts a throwaway local Dask cluster of
``--workers`` single-threaded processes (no memory limit, no dashboard); it is how the backend is tested.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .baselines import ln_floor_ms, serf_model_ms
from .scenario import Scenario, load, override

COLUMNS = ("scenario", "protocol", "nodes", "loss", "seed", "converged_fraction", "t50_ms", "t99_ms", "t100_ms",
           "bytes_per_node", "dissemination_bytes_per_node", "idle_bytes_per_node_s", "policy_bytes",
           "serf_model_ms", "ln_floor_ms", "events", "invariant_violations", "wall_s", "max_rss_mb")


@dataclass(frozen=True)
class Case:
    scenario: str  # a bundled name or a file
    protocol: str
    nodes: int | None
    loss: float | None
    seed: int
    duration_ms: int | None = None


def cases(scenario: str, seeds: Sequence[int], losses: Sequence[float | None], sizes: Sequence[int | None],
          protocols: Sequence[str], duration_ms: int | None = None) -> list[Case]:
    """Every combination, sizes outermost (the big runs start first), then protocols, loss, seeds."""
    return [Case(scenario, p, n, loss, s, duration_ms)
            for n, p, loss, s in itertools.product(sizes, protocols, losses, seeds)]


def scenario_of(case: Case) -> Scenario:
    return override(load(case.scenario), nodes=case.nodes, seed=case.seed, loss=case.loss, protocol=case.protocol,
                    duration_ms=case.duration_ms)


def run_case(case: Case) -> dict[str, Any]:
    """One run (in a worker process): its row of the table."""
    from .engine import run_scenario

    sc = scenario_of(case)
    report, _sim = run_scenario(sc, progress=False)
    row = {k: report.get(k) for k in COLUMNS}
    row["serf_model_ms"] = serf_model_ms(report["nodes"], report["loss"], sc.gossip_config().fanout)
    row["ln_floor_ms"] = ln_floor_ms(report["nodes"], report["loss"], _mean_one_way_ms(sc))
    row["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _mean_one_way_ms(sc: Scenario) -> float:
    """The mean one-way latency between two random nodes (regions equally populated)."""
    regions = sc.nodes.regions
    total = 0.0
    for a in regions:
        for b in regions:
            if a == b:
                total += sc.network.intra_region_ms
            else:
                total += sc.network.latency_ms.get(f"{a}.{b}", sc.network.latency_ms.get(f"{b}.{a}",
                                                                                          sc.network.cross_region_ms))
    return total / (len(regions) ** 2)


def run_all(todo: Sequence[Case], workers: int, on_done: Callable[[int], None] | None = None,
            runner: Callable[[Case], dict[str, Any]] = run_case, scheduler: str | None = None) -> list[dict[str, Any]]:
    """Run every case on ``workers`` processes (1: in this process), or on the Dask cluster at
    ``scheduler`` (``"local"``: a local one of ``workers`` processes); rows in case order."""
    if scheduler is not None:
        return _run_on_dask(todo, scheduler, workers, on_done, runner)
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    if workers <= 1:
        for k, c in enumerate(todo):
            rows[k] = runner(c)
            if on_done:
                on_done(k)
        return [r for r in rows if r is not None]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future[dict[str, Any]], int] = {pool.submit(runner, c): k for k, c in enumerate(todo)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                k = pending.pop(f)
                rows[k] = f.result()
                if on_done:
                    on_done(k)
    return [r for r in rows if r is not None]


class ClusterUnavailable(RuntimeError):
    """The Dask backend was asked for but cannot be used (not installed, scheduler unreachable)."""


def _run_on_dask(todo: Sequence[Case], scheduler: str, workers: int, on_done: Callable[[int], None] | None,
                 runner: Callable[[Case], dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise ClusterUnavailable("--scheduler needs Dask distributed: pip install 'policymesh[cluster]'") from e
    cluster = None
    try:
        if scheduler == "local":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                                   dashboard_address=None, host="127.0.0.1")
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise ClusterUnavailable(f"cannot reach the Dask scheduler at {scheduler}: {e}") from e
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    try:
        # pure=False: two equal cases are still two runs (the table has one row per case)
        futures = {client.submit(runner, c, pure=False): k for k, c in enumerate(todo)}
        for f in as_completed(futures):
            k = futures[f]
            rows[k] = f.result()
            if on_done:
                on_done(k)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [r for r in rows if r is not None]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# -- output --------------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'protocol':<13}{'nodes':>8}{'loss':>6}{'seed':>6}{'t50':>7}{'t99':>7}{'t100':>7}{'serf':>7}"
            f"{'B/node':>9}{'idle B/s':>9}{'wall s':>8}{'RSS MB':>8}{'viol':>5}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['protocol']:<13}{r['nodes']:>8}{r['loss']:>6}{r['seed']:>6}{_n(r['t50_ms']):>7}"
                     f"{_n(r['t99_ms']):>7}{_n(r['t100_ms']):>7}{_n(r['serf_model_ms']):>7}"
                     f"{_n(r['bytes_per_node']):>9}{_n(r['idle_bytes_per_node_s']):>9}{_n(r['wall_s']):>8}"
                     f"{_n(r['max_rss_mb']):>8}{r['invariant_violations']:>5}")
    return "\n".join(lines)


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def write_json(rows: Sequence[dict[str, Any]], path: str) -> None:
    text = json.dumps(list(rows), indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """t100 against N (median over seeds and losses shown separately), the Serf model, the ln N floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, float], dict[int, list[float]]] = {}
    for r in rows:
        if r["t100_ms"] is not None:
            groups.setdefault((r["protocol"], r["loss"]), {}).setdefault(r["nodes"], []).append(r["t100_ms"])
    for (proto, loss), by_n in sorted(groups.items()):
        ns = sorted(by_n)
        ax.plot(ns, [statistics.median(by_n[n]) for n in ns], marker="o", label=f"{proto}, loss {loss}")
    sizes = sorted({r["nodes"] for r in rows})
    if sizes:
        grid = sorted(set(sizes) | {int(v) for v in _logspace(min(sizes), max(sizes), 12)})
        for loss in sorted({r["loss"] for r in rows}):
            ax.plot(grid, [serf_model_ms(n, loss) for n in grid], linestyle="--", label=f"Serf model, loss {loss}")
        one_way = {r["nodes"]: r["ln_floor_ms"] for r in rows}
        ax.plot(sizes, [one_way[n] for n in sizes], linestyle=":", color="black", label="ln N floor")
    ax.set_xscale("log")
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel("t100 of the last version (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _logspace(lo: int, hi: int, k: int) -> list[float]:
    if lo <= 1 or hi <= lo:
        return [float(lo), float(hi)]
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (k - 1)) for i in range(k)]
