"""meshsim: run simulation scenarios.

    meshsim run SCENARIO [--nodes N --seed S --loss P --protocol gossip|central-pull|flood]
                         [--duration-ms MS] [--json FILE] [--plot FILE.png] [--quiet] [--real [--keep-dir]]
    meshsim compare SCENARIO [same overrides]      (gossip vs central-pull vs flood, same seed)
    meshsim compare --real SCENARIO [overrides]    (the simulator and real daemons side by side)
    meshsim sweep SCENARIO [--seeds 1,2,3] [--loss 0,0.1] [--nodes 100,1000] [--protocols gossip,flood]
                           [--workers N] [--scheduler tcp://HOST:PORT|local]
                           [--json FILE] [--csv FILE] [--plot FILE.png]   (parallel runs; Dask with --scheduler)
    meshsim list                                     (bundled scenarios)

``--real`` (root) runs the same scenario as a chaos drill on real ``meshnode`` processes, one network
namespace per node, real nftables (simulations/drill/real.py).

Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from meshnode import version_string

from .drill.real import DrillError
from .report import PlotUnavailableError
from .scenario import PROTOCOLS, TRANSPORTS, ScenarioError, bundled, load, override

EXIT_ERROR = 2
EXIT_VIOLATION = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        sys.stderr.write(f"meshsim: error: {message}\n")
        raise SystemExit(EXIT_ERROR)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"loss must be in [0, 1), got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _overrides(p: argparse.ArgumentParser, protocol: bool = True) -> None:
    p.add_argument("scenario", help="scenario file, or the name of a bundled scenario (see `meshsim list`)")
    p.add_argument("--nodes", type=_positive,
                   help="override the node count (with --real: default the scenario's count, at most 8)")
    p.add_argument("--seed", type=int, help="override the master seed")
    p.add_argument("--loss", type=_fraction, help="override the per-segment loss probability (0..1)")
    p.add_argument("--duration-ms", type=_positive,
                   help="override the duration (virtual ms; with --real, wall-clock ms)")
    p.add_argument("--transport", choices=TRANSPORTS,
                   help="override the transport model: tcp (every message on TCP), mixed (as the daemon: small "
                        "dissemination messages as acknowledged datagrams, the rest on TCP) or datagram "
                        "(every message a lossy datagram)")
    if protocol:
        p.add_argument("--protocol", choices=PROTOCOLS, help="gossip (default), central-pull or flood")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, no fault schedule on stderr (with --real: no progress lines)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshsim", description="Deterministic simulator of the policymesh gossip protocol.")
    parser.add_argument("--version", action="version", version=version_string("meshsim"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one scenario and print a summary",
                         description="Run one scenario in the simulator (same seed, same report apart from "
                                     "wall_s), or with --real as a chaos drill on real daemons with the same "
                                     "seeded fault schedule. Exit 3 when an invariant fails.")
    _overrides(run)
    run.add_argument("--json", metavar="FILE", help="write the full JSON report here ('-' for stdout)")
    run.add_argument("--plot", metavar="FILE.png",
                     help="write a PNG of converged fraction over time per region, the faults shaded")
    _real_flags(run)
    cmp = sub.add_parser("compare", help="run gossip, central-pull and flood on the same scenario and seed; "
                                         "with --real: the simulator and real daemons side by side",
                         description="Baselines side by side on the same scenario and seed; with --real, the "
                                     "simulator (at the real drill's node count) beside the real drill.")
    _overrides(cmp, protocol=False)
    _real_flags(cmp)
    cmp.add_argument("--json", metavar="FILE", help="write the three reports as one JSON list "
                                                    "(with --real: {\"sim\": ..., \"real\": ...})")
    sw = sub.add_parser("sweep", help="run a scenario over seeds x loss x sizes x protocols on every core",
                        description="Independent runs of one scenario over every combination of the lists "
                                    "given, in parallel processes; one table (stdout, JSON, CSV) and a plot of "
                                    "t100 against N with the Serf model and the ln N floor.")
    sw.add_argument("scenario", help="scenario file, or the name of a bundled scenario (see `meshsim list`)")
    sw.add_argument("--seeds", type=_int_list, default=None,
                    help="comma-separated seeds (default: the scenario's seed)")
    sw.add_argument("--loss", type=_loss_list, default=[None], help="comma-separated loss probabilities")
    sw.add_argument("--nodes", type=_int_list, default=[None], help="comma-separated node counts")
    sw.add_argument("--protocols", type=_protocol_list, default=["gossip"],
                    help=f"comma-separated protocols ({', '.join(PROTOCOLS)}; default gossip)")
    sw.add_argument("--duration-ms", type=_positive, help="override the virtual duration")
    sw.add_argument("--workers", type=_positive, help="parallel processes (default: every core of this machine)")
    sw.add_argument("--scheduler", metavar="ADDRESS",
                    help="run the cases on the Dask distributed cluster at ADDRESS (tcp://HOST:8786; needs the "
                         "'cluster' extra here and on the workers), or 'local' for a local Dask cluster of "
                         "--workers processes")
    sw.add_argument("--json", metavar="FILE", help="write the rows as one JSON list ('-' for stdout)")
    sw.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    sw.add_argument("--plot", metavar="FILE.png", help="plot t100 against N (needs matplotlib)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("list", help="list bundled scenarios", description="List bundled scenarios.")
    return parser


def _real_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", action="store_true",
                   help="chaos drill on real meshnode processes (root): one network namespace per node on a "
                        "bridge, real nftables, loss/partitions as nftables drop rules, crashes as kill -9; "
                        "latency is not emulated")
    p.add_argument("--keep-dir", action="store_true", help="with --real: keep the drill's directory (logs, state)")


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _loss_list(text: str) -> list[float | None]:
    return [_fraction(x) for x in text.split(",") if x.strip()] or [None]


def _protocol_list(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in vals if v not in PROTOCOLS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {bad or text!r} (choose from {', '.join(PROTOCOLS)})")
    return vals


def _sweep(args: argparse.Namespace) -> int:
    from . import sweep

    if args.plot:
        from .report import require_plotting

        require_plotting()
    base = load(args.scenario)
    seeds = args.seeds or [base.seed]
    todo = sweep.cases(args.scenario, seeds, args.loss, args.nodes, args.protocols, args.duration_ms)
    for c in todo:  # every combination is valid before anything runs
        sweep.scenario_of(c)
    workers = min(args.workers or sweep.default_workers(), len(todo))
    bar = None
    if not args.quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            where = f"Dask at {args.scheduler}" if args.scheduler and args.scheduler != "local" else f"{workers} workers"
            bar = tqdm(total=len(todo), unit="run", desc=f"sweep {base.name} ({where})", file=sys.stderr)
        except ImportError:
            bar = None
    try:
        rows = sweep.run_all(todo, workers, on_done=(lambda _k: bar.update(1)) if bar is not None else None,
                             scheduler=args.scheduler)
    except sweep.ClusterUnavailable as e:
        if bar is not None:
            bar.close()
        print(f"meshsim sweep: {e}", file=sys.stderr)
        return 2
    if bar is not None:
        bar.close()
    if args.json == "-":
        sweep.write_json(rows, "-")
    else:
        print(sweep.table(rows))
        if args.json:
            sweep.write_json(rows, args.json)
    if args.csv:
        sweep.write_csv(rows, args.csv)
    if args.plot:
        sweep.plot(rows, args.plot)
    return EXIT_VIOLATION if any(r["invariant_violations"] for r in rows) else 0


def _straggler(x: dict[str, Any]) -> str:
    why = (f" (joined at {x['joined_ms']} ms)" if "joined_ms" in x
           else f" (restarted at {x['restarted_ms']} ms)" if "restarted_ms" in x else "")
    return f"{x['node']} {x['region']} {x['ms']} ms{why}"


def _summary(r: dict[str, Any]) -> str:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v} ms"

    lines = [
        f"scenario {r['scenario']}  protocol {r['protocol']}  nodes {r['nodes']}  loss {r['loss']}  seed {r['seed']}"
        + ("  (REAL daemons)" if r.get("mode") == "real" else ""),
        f"  converged {r['converged_fraction']:.4f}  t50 {ms(r['t50_ms'])}  t99 {ms(r['t99_ms'])}  "
        f"t100 {ms(r['t100_ms'])}  (Serf model {r['serf_model_ms']} ms, ratio {r['ratio_vs_serf_model']})",
    ]
    slow = (r.get("versions") or [{}])[-1].get("slowest")
    if slow:
        lines.append("  slowest: " + ", ".join(_straggler(x) for x in slow))
    if r.get("mode") != "real":
        lines += [
            f"  bytes/node for the version {r['bytes_per_node']} (dissemination {r['dissemination_bytes_per_node']},"
            f" budget {r['bytes_budget_per_node']})  idle {r['idle_bytes_per_node_s']} B/s/node",
            f"  false detections {r['false_detections']} ({r['false_detections_per_node_hour']}/node-hour)  "
            f"events {r['events']}  wall {r['wall_s']} s  invariant violations {r['invariant_violations']}",
        ]
        if "datagrams" in r:
            d = r["datagrams"]
            lines.append(f"  datagrams: {d['messages']} messages, {d['sent']} sent, {d['acks']} acks, "
                         f"{d['retransmits']} retransmitted, {d['fallbacks']} to the stream")
    else:
        lines.append(f"  versions {len(r['versions'])}  live at end {r['live_nodes']}  wall {r['wall_s']} s  "
                     f"invariant violations {r['invariant_violations']}")
    inv = r.get("invariants") or {}
    if inv:
        bad = [f"{name} FAILED ({res['violations']})" for name, res in inv.items() if not res["ok"]]
        lines.append(f"  drill invariants ({r.get('mode', 'sim')}, {r['drill']['samples']} samples): "
                     + (", ".join(bad) if bad else f"all {len(inv)} hold"))
    d = r.get("drill") or {}
    if r.get("mode") == "real":
        lines.append(f"  real: kills {d.get('kills')}  restarts {d.get('restarts')}  samples {d.get('samples')}  "
                     f"kernel gaps {len(d.get('kernel_gaps') or [])}  alerts {r.get('alerts')}  "
                     f"not emulated: {', '.join(d.get('not_emulated') or [])}")
    for v in r["violations"][:5]:
        lines.append(f"  VIOLATION {v}")
    return "\n".join(lines)


def _scenario(args: argparse.Namespace, protocol: str | None, nodes: int | None) -> Any:
    return override(load(args.scenario), nodes=nodes, seed=args.seed, loss=args.loss, protocol=protocol,
                    duration_ms=args.duration_ms, transport=getattr(args, "transport", None))


def _run_one(args: argparse.Namespace, protocol: str | None, nodes: int | None = None) -> tuple[dict[str, Any], Any]:
    from .drill.schedule import plan, print_schedule
    from .engine import run_scenario

    sc = _scenario(args, protocol, nodes or args.nodes)
    if not args.quiet:
        print_schedule(plan(sc), [f"n{i:05d}" for i in range(sc.nodes.count)], sc.seed, sys.stderr.write)
    return run_scenario(sc, progress=not args.quiet and sys.stderr.isatty())


def _run_real(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The drill on real daemons; returns (report, the drill) like ``_run_one``."""
    import signal

    from .drill.real import RealDrill

    def terminate(_sig: int, _frame: Any) -> None:
        raise SystemExit(143)  # unwinds through the drill's clean-up (processes, namespaces, mounts)

    signal.signal(signal.SIGTERM, terminate)
    sc = _scenario(args, "gossip", None)
    if getattr(args, "protocol", None) not in (None, "gossip"):
        raise ScenarioError("--real runs the gossip protocol (the real meshnode) only")
    drill = RealDrill(sc, nodes=args.nodes, progress=not args.quiet, keep_dir=args.keep_dir)
    return drill.run(), drill


def _plot(report: dict[str, Any], run: Any, path: str) -> None:
    from .report import plot, plot_series

    if report.get("mode") == "real":
        from .drill.realreport import series

        ts, values = series(run)
        plot_series(report, ts, values, path)
    else:
        plot(run, report, path)


def _failed(report: dict[str, Any]) -> bool:
    return bool(report["invariant_violations"]) or not all(r["ok"] for r in (report.get("invariants") or {}).values())


def _compare_real(args: argparse.Namespace) -> int:
    real, _ = _run_real(args)
    sim, _ = _run_one(args, "gossip", nodes=real["nodes"])
    rows = [("nodes", "nodes"), ("live nodes at end", "live_nodes"), ("converged fraction", "converged_fraction"),
            ("t50 ms", "t50_ms"), ("t99 ms", "t99_ms"), ("t100 ms", "t100_ms"),
            ("not converged at end", "not_converged_at_end"), ("invariant violations", "invariant_violations"),
            ("wall s", "wall_s")]
    print(f"scenario {real['scenario']}  seed {real['seed']}  loss {real['loss']}  "
          f"(real: {', '.join(real['drill']['not_emulated'])} not emulated)")
    print(f"{'':<32}{'simulator':>12}{'real':>14}")
    for label, key in rows:
        print(f"{label:<32}{_n(sim.get(key)):>12}{_n(real.get(key)):>14}")
    for v_sim, v_real in zip(sim["versions"], real["versions"], strict=False):
        print(f"{'serial ' + str(v_sim['serial']) + ' t100 ms':<32}{_n(v_sim['t100_ms']):>12}{_n(v_real['t100_ms']):>14}")
    for name in real["invariants"]:
        ok_sim = sim["invariants"][name]["ok"] if name in sim.get("invariants", {}) else None
        print(f"{name:<32}{_ok(ok_sim):>12}{_ok(real['invariants'][name]['ok']):>14}")
    if args.json:
        from .report import write_json

        write_json({"sim": sim, "real": real}, args.json)  # type: ignore[arg-type]
    return EXIT_VIOLATION if _failed(sim) or _failed(real) else 0


def _ok(v: Any) -> str:
    return "-" if v is None else ("ok" if v else "FAIL")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "list":
            for name in bundled():
                print(name)
            return 0
        if args.command == "run":
            from .report import require_plotting, to_json, write_json

            if args.plot:
                require_plotting()
            report, sim = _run_real(args) if args.real else _run_one(args, args.protocol)
            # One run per process: the simulated world (about 10^8 objects at 100,000 nodes) goes with the
            # exit.  Frozen, the cyclic collector no longer scans it: at 100,000 nodes that scan took about
            # 1.5 minutes after the run and ~0.4 GiB (README, "Memory at 100,000 nodes").
            gc.freeze()

            if args.json == "-":
                sys.stdout.write(to_json(report))
            else:
                print(_summary(report))
                if args.json:
                    write_json(report, args.json)
            if args.plot:
                _plot(report, sim, args.plot)
            if _failed(report):
                failed = [n for n, r in (report.get("invariants") or {}).items() if not r["ok"]]
                sys.stderr.write(f"meshsim: {report['invariant_violations']} invariant violation(s)"
                                 f"{' (' + ', '.join(failed) + ')' if failed else ''}; replay with "
                                 f"--seed {report['seed']}\n")
                return EXIT_VIOLATION
            return 0
        if args.real:
            return _compare_real(args)
        reports = []
        for proto in PROTOCOLS:
            report, _ = _run_one(args, proto)
            reports.append(report)
        print(f"{'protocol':<13}{'converged':>10}{'t50 ms':>9}{'t99 ms':>9}{'t100 ms':>9}{'B/node':>10}"
              f"{'diss B/node':>12}{'idle B/s':>10}{'viol':>6}")
        for r in reports:
            print(f"{r['protocol']:<13}{r['converged_fraction']:>10.4f}{_n(r['t50_ms']):>9}{_n(r['t99_ms']):>9}"
                  f"{_n(r['t100_ms']):>9}{_n(r['bytes_per_node']):>10}{_n(r['dissemination_bytes_per_node']):>12}"
                  f"{_n(r['idle_bytes_per_node_s']):>10}{r['invariant_violations']:>6}")
        if args.json:
            from .report import write_json

            write_json(reports, args.json)  # type: ignore[arg-type]
        return EXIT_VIOLATION if any(r["invariant_violations"] for r in reports) else 0
    except (ScenarioError, PlotUnavailableError, DrillError) as exc:
        sys.stderr.write(f"meshsim: error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"meshsim: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("meshsim: interrupted\n")
        return 130


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


if __name__ == "__main__":
    raise SystemExit(main())
