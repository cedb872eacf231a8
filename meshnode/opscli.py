"""meshctl commands that talk to a running mesh: policy publish, status, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .authority_store import CliError


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_publish(args: argparse.Namespace) -> int:
    from .client import publish

    try:
        envelope = Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    roots = []
    for r in args.root_chain or []:
        try:
            roots.append(Path(r).read_bytes())
        except OSError as exc:
            raise CliError(f"{r}: cannot read: {exc.strerror or exc}") from None
    reply = publish(args.node, Path(args.identity), envelope, roots, timeout_s=args.timeout)
    if not reply.get("ok"):
        print(f"refused by {args.node}: {reply.get('reason')}", file=sys.stderr)
        return 1
    reason = f" ({reply['reason']})" if reply.get("reason") else ""
    _out(f"accepted by {args.node}: serial {reply.get('serial')} stored and gossiping{reason}")
    return 0


def members_of(status: dict[str, Any]) -> list[dict[str, Any]]:
    view = status.get("cluster_view") or {}
    members = view.get("members") or []
    return sorted(members, key=lambda m: (str(m.get("region", "")), str(m.get("node_id", ""))))


def format_status(status: dict[str, Any]) -> str:
    pol = status.get("policy", {})
    enf = status.get("enforcement", {})
    lines = [
        f"node {status.get('node')} (region {status.get('region')}, cluster {status.get('cluster')}): "
        f"policy serial {pol.get('serial')} [{pol.get('state')}], enforcing serial {enf.get('applied_serial')} "
        f"with {enf.get('backend')}" + (" (NOT ENFORCING: file backend override)" if not enf.get("enforcing", True) else ""),
    ]
    if status.get("overrides"):
        lines.append(f"active overrides: {', '.join(status['overrides'])}")
    members = members_of(status)
    conv = (status.get("cluster_view") or {}).get("convergence") or {}
    if members:
        newest = max(int(m.get("serial") or 0) for m in members)
        newest = max(newest, int(pol.get("serial") or 0))
        judged = "converged" in members[0]  # the core judges convergence on enforced serial + hash
        lines.append("")
        lines.append(f"{'REGION':10s} {'NODE':16s} {'LIVENESS':9s} {'SERIAL':>7s} {'STATE':12s} {'RULESET':12s} CONVERGED")
        for m in members:
            serial = int(m.get("serial") or 0)
            ok = bool(m.get("converged")) if judged else serial >= newest
            lines.append(
                f"{m.get('region') or '-':10s} {m.get('node_id') or '-':16s} {m.get('liveness') or '-':9s} "
                f"{serial if m.get('serial') is not None else '-':>7} {m.get('state') or '-':12s} "
                f"{(m.get('ruleset_hash') or '-')[:12]:12s} {'yes' if ok else 'no'}"
            )
        done = sum(1 for m in members if (m.get("converged") if judged else int(m.get("serial") or 0) >= newest))
        target = conv.get("target_serial", newest) if judged else newest
        lines.append("")
        lines.append(f"{done}/{len(members)} members enforce serial {target}"
                     + (f" (hash {conv.get('target_hash')})" if judged and conv.get("target_hash") else ""))
    eq = conv.get("equivocation")
    if eq:
        lines.append(f"EQUIVOCATION at serial {eq.get('serial')}: validly signed payloads "
                     f"{', '.join(eq.get('hashes') or [])}; every node keeps {eq.get('kept')} (the lower hash)"
                     + (f"; reported by {', '.join(eq['reported_by'])}" if eq.get("reported_by") else ""))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from .client import status

    st = status(args.node, Path(args.identity), timeout_s=args.timeout)
    if args.json:
        _out(json.dumps(st, indent=2, default=str))
    else:
        _out(format_status(st))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def register(sub: argparse._SubParsersAction, policy_sub: argparse._SubParsersAction) -> None:
    p = policy_sub.add_parser("publish", help="push a signed policy to a node over an operator channel")
    p.add_argument("file")
    p.add_argument("--node", required=True, metavar="HOST:PORT", help="any node's mesh address")
    p.add_argument("--identity", required=True, metavar="DIR", help="operator identity (node enroll --role operator)")
    p.add_argument("--root-chain", action="append", metavar="ROOTFILE", help="newer root(s) to send first (repeatable)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("status", help="cluster-wide convergence view, read from any single node")
    p.add_argument("--node", required=True, metavar="HOST:PORT")
    p.add_argument("--identity", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=cmd_status)

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
