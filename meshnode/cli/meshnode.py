"""meshnode: run the daemon, or print the ruleset a node would apply."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import MeshError
from protocol.trust import TrustedState

from ..config import load_config
from ..identity import load_identity
from ..state import StateStore
from .common import CliParser, VersionAction, exit_code, read


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="meshnode", description="policymesh node daemon: verifies, stores, gossips and enforces "
                "signed policy versions.")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=CliParser)
    r = sub.add_parser("run", help="run the daemon (SIGTERM stops it gracefully, SIGHUP reloads the config)")
    r.add_argument("--config", required=True, metavar="node.toml")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check-config", help="validate a node config and its identity files, then exit")
    c.add_argument("--config", required=True, metavar="node.toml")
    c.add_argument("--json", action="store_true", help="print the result as JSON (also when invalid)")
    c.set_defaults(func=cmd_check)
    d = sub.add_parser("render", help="print the complete ruleset this node would apply (one idempotent transaction)")
    d.add_argument("--config", required=True, metavar="node.toml")
    d.add_argument("--policy", metavar="FILE", help="signed policy (default: the node's stored last-known-good)")
    d.add_argument("--peer-cert", action="append", default=[], metavar="FILE", help="member certificate (repeatable)")
    d.add_argument("--format", default="nft", choices=["nft", "json", "iptables"],
                   help="nft syntax (default), nft JSON, or the iptables backend's ipset/iptables-restore input")
    d.set_defaults(func=cmd_render)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from ..daemon import run_daemon
    from ..logsetup import configure

    configure(args.log_level)
    return run_daemon(Path(args.config))


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 for a usable config, 1 for an invalid one, 3 when it or an identity file cannot be read."""
    try:
        read(args.config, "node config")
        config = load_config(Path(args.config))
        cfg = config.cfg
        files = [config.resolve(f) for f in (cfg.identity.cert, cfg.identity.identity_key, cfg.identity.static_key,
                                             cfg.trust.root)]
        for f in files:
            read(f, "identity file")
        identity = load_identity(*files)
        TrustedState(identity.anchor).verify_certificate(identity.cert_bytes, time.time())
    except (MeshError, OSError, ValueError) as exc:
        if args.json:
            print(json.dumps({"valid": False, "config": args.config, "error": str(exc) or type(exc).__name__}))
        raise
    overrides = config.active_overrides()
    if args.json:
        print(json.dumps({"valid": True, "config": args.config, "node_id": identity.node_id,
                          "region": identity.cert.region, "backend": cfg.enforce.backend, "overrides": overrides},
                         indent=2))
        return 0
    print(f"{args.config}: ok (node {identity.node_id}, region {identity.cert.region}, backend {cfg.enforce.backend}"
          + (f", overrides: {', '.join(config.active_overrides())}" if config.active_overrides() else "") + ")")
    return 0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MeshError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def cmd_render(args: argparse.Namespace) -> int:
    from ..enforcer import render_options
    from .render import render_command

    config = load_config(Path(args.config))
    cfg = config.cfg
    identity = load_identity(config.resolve(cfg.identity.cert), config.resolve(cfg.identity.identity_key),
                          config.resolve(cfg.identity.static_key), config.resolve(cfg.trust.root))
    now = time.time()
    trust = TrustedState(identity.anchor, skew_s=cfg.trust.clock_skew_s)
    StateStore(config.resolve(cfg.node.data_dir)).load_into(trust, now, clean_temps=False)
    text = render_command(
        policy_bytes=_read(args.policy, "policy") if args.policy else None,
        own_cert_bytes=identity.cert_bytes,
        peer_cert_bytes=[_read(p, "certificate") for p in args.peer_cert],
        trust=trust,
        now=now,
        options=render_options(config),
        fmt=args.format,
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (MeshError, OSError, ValueError) as exc:
        msg = str(exc) or type(exc).__name__
        print(f"meshnode: error: {msg}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
