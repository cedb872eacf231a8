"""meshctl commands that talk to a running mesh: ``policy publish``, ``status``, ``alerts`` and ``demo``.

The operator client (aiohttp) and the demo are imported when their command runs: the offline commands
(authority, enroll, sign) start without them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_INVALID, out, read

OPERATOR_CONFIG = "operator.toml"


def cmd_publish(args: argparse.Namespace) -> int:
    from ..client import publish_first

    envelope = read(args.file, "signed policy")
    roots = [read(r, "root metadata") for r in args.root_chain or []]
    nodes = publish_targets(args)
    answer = publish_first(nodes, Path(args.identity), envelope, roots, timeout_s=args.timeout)
    reply = answer.reply
    if args.json:
        out(json.dumps({"node": answer.node, "asked": nodes, "unreachable": answer.errors, **reply}, indent=2,
                       default=str))
    if not reply.get("ok"):
        print(f"refused by {answer.node}: {reply.get('reason')}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        return 0
    reason = f" ({reply['reason']})" if reply.get("reason") else ""
    out(f"accepted by {answer.node}: serial {reply.get('serial')} stored and gossiping{reason}")
    return 0


def publish_targets(args: argparse.Namespace) -> list[str]:
    """The nodes a publish goes to: every ``--node``, else the ``[mesh] seeds`` of the operator's config
    (``--config``, by default ``operator.toml`` in the identity directory)."""
    if args.node:
        return list(dict.fromkeys(args.node))
    import tomllib

    from ..authority_store import CliError, UsageError
    from ..config import ConfigError, split_hostport

    path = Path(args.config) if args.config else Path(args.identity) / OPERATOR_CONFIG
    if not path.is_file():
        raise UsageError(f"no --node given and no operator config at {path} (a TOML file with [mesh] seeds)")
    try:
        doc = tomllib.loads(read(str(path), "operator config").decode())
        seeds = doc.get("mesh", {}).get("seeds", [])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, str) for s in seeds):
            raise ConfigError(f"{path}: [mesh] seeds must be a non-empty list of \"HOST:PORT\"")
        for s in seeds:
            split_hostport(s, f"{path}: mesh.seeds")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ConfigError, AttributeError) as exc:
        raise CliError(f"{path}: {exc}") from None
    return list(dict.fromkeys(seeds))


def cmd_status(args: argparse.Namespace) -> int:
    from ..client import status
    from ..status_view import format_status

    st = status(args.node, Path(args.identity), timeout_s=args.timeout)
    if args.json:
        out(json.dumps(st, indent=2, default=str))
    else:
        out(format_status(st))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """This node's open alerts, and per member of the cluster (signed status view) its liveness, policy
    state and open alerts per severity, with the cluster's totals."""
    import asyncio

    from ..client import OperatorError, request
    from ..status_view import alert_counts_text, members_of

    reply = asyncio.run(request(args.node, Path(args.identity), {"op": "alerts"}, args.timeout))
    if not reply.get("ok"):
        raise OperatorError(f"{args.node}: {reply.get('reason', 'alerts refused')}")
    alerts, st = list(reply.get("alerts", [])), dict(reply.get("status", {}))
    members = [{k: m.get(k) for k in ("node_id", "liveness", "serial", "state", "converged", "alerts_open")}
               for m in members_of(st)]
    cluster = (st.get("cluster_view") or {}).get("alerts")
    if args.json:
        out(json.dumps({"node": st.get("node"), "alerts": alerts, "members": members, "cluster_alerts": cluster},
                       indent=2, default=str))
        return 0
    lines = [f"{st.get('node', args.node)}: {len(alerts)} open alert(s)"]
    lines += [f"  {a['severity']:<8} {a['check']}{' (' + a['subject'] + ')' if a.get('subject') else ''}: "
              f"{a['summary']}" for a in alerts]
    lines.append("cluster (signed status view)" + (f": open alerts {alert_counts_text(cluster)}" if cluster else "")
                 + ":")
    lines += [f"  {m['node_id']:<20} {m['liveness'] or '?':<8} serial {m['serial']} policy {m['state'] or '?'}"
              f"{'' if m['converged'] else ' NOT converged'}; open alerts: {alert_counts_text(m['alerts_open'])}"
              for m in members]
    out("\n".join(lines))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args)


def register(sub: argparse._SubParsersAction, policy_sub: argparse._SubParsersAction) -> None:
    p = policy_sub.add_parser(
        "publish", help="push a signed policy to nodes over operator channels (to several at once: the first "
                        "node that verified and stored it answers)")
    p.add_argument("file")
    p.add_argument("--node", action="append", metavar="HOST:PORT",
                   help="a node's mesh address (repeatable: sent to all at once, the first acceptance wins); "
                        "default: every seed of the operator config")
    p.add_argument("--config", metavar="FILE",
                   help=f"operator config whose [mesh] seeds are the nodes to publish to when no --node is given "
                        f"(default: IDENTITY/{OPERATOR_CONFIG})")
    p.add_argument("--identity", required=True, metavar="DIR", help="operator identity (node enroll --role operator)")
    p.add_argument("--root-chain", action="append", metavar="ROOTFILE", help="newer root(s) to send first (repeatable)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print the node's reply as JSON")
    p.set_defaults(func=cmd_publish)

    for name, func, text in (("status", cmd_status, "cluster-wide convergence view, read from any single node"),
                             ("alerts", cmd_alerts, "open alerts of a node, and the cluster's state from its "
                                                    "status view")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--node", required=True, metavar="HOST:PORT")
        p.add_argument("--identity", required=True, metavar="DIR")
        p.add_argument("--json", action="store_true")
        p.add_argument("--timeout", type=float, default=20.0)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="run a local demo mesh of real meshnode processes")
    p.add_argument("--nodes", type=int, default=6, help="number of nodes (default 6)")
    p.add_argument("--regions", type=int, default=3, help="number of regions (default 3)")
    p.add_argument("--netns", action="store_true",
                   help="(root) one network namespace per node with real nftables enforcement")
    p.add_argument("--once", action="store_true", help="run the scripted tour and exit")
    p.add_argument("--json", metavar="FILE", help="with --once: write the report here")
    p.add_argument("--dir", metavar="DIR", help="work directory (default: a new temporary directory)")
    p.add_argument("--base-port", type=int, default=17000, help="first port used (default 17000)")
    p.set_defaults(func=cmd_demo)
