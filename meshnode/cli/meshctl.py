"""meshctl: the operator's tool (authority, enrollment, signing, and talking to a running mesh).

Every command has --help; errors are one clear line on stderr and a non-zero exit, never a traceback.

Start-up is kept short (an operator's publish waits on it): the parser is built from this module, the
common one and ``mesh.py`` alone; each command's module, the trust layer, nacl and the network client
are imported when a command runs (``_command``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from . import mesh
from .common import CliParser, VersionAction, exit_code

ROLE_NAMES = ("root", "policy", "enroll")
"""protocol.trust.ROLE_NAMES, repeated so that ``--help`` does not import the trust layer
(tests/test_cli_startup.py pins them equal)."""
DEFAULT_MESH_PORT = 7946
DEFAULT_ADMIN_PORT = 9946
"""meshnode.config's defaults, repeated for the same reason (pinned equal by the same test)."""


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``meshnode.cli.<module>``, imported when it runs."""
    def run(args: argparse.Namespace) -> int:
        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return func(args)
    run.__name__ = name
    return run


def _add_role_counts(p: argparse.ArgumentParser, default_text: str) -> None:
    for role in ROLE_NAMES:
        p.add_argument(f"--{role}-keys", type=int, metavar="N", help=f"number of {role} keys ({default_text})")
        p.add_argument(f"--{role}-threshold", type=int, metavar="M", help=f"signatures required of {role} keys")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="meshctl", description="policymesh operator tool: authority, enrollment, signed policy, "
                     "and the running mesh.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="group", required=True, parser_class=CliParser)

    auth = sub.add_parser("authority", help="create and manage the signing authority")
    asub = auth.add_subparsers(dest="cmd", required=True, parser_class=CliParser)
    p = asub.add_parser("init", help="create an authority: root, policy and enroll keys and root v1")
    p.add_argument("dir", help="authority directory to create")
    p.add_argument("--cluster", default="policymesh", help="cluster name bound into every signature and channel")
    p.add_argument("--expires", default="365d", help="root expiry (e.g. 365d)")
    p.add_argument("--holders", metavar="NAME,NAME,...",
                   help="write key I of every role for holder I, in DIR/secrets/HOLDER/ (default: all in DIR/secrets/)")
    p.add_argument("--passphrase-file", action="append", metavar="[HOLDER=]FILE",
                   help="encrypt the keys (of HOLDER, or every key) with the passphrase in FILE (repeatable)")
    _add_role_counts(p, "default 1")
    p.set_defaults(func=_command("authority", "cmd_authority_init"))
    p = asub.add_parser("show", help="show the current root: roles, key ids, thresholds, expiry")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command("authority", "cmd_authority_show"))
    p = asub.add_parser("rotate-root", help="make root N+1 (new keys for --rotate roles), signed by old and new root keys")
    p.add_argument("dir")
    p.add_argument("--rotate", action="append", metavar="ROLE", help="replace this role's keys (repeatable)")
    p.add_argument("--expires", default="365d")
    p.add_argument("--finish", metavar="FILE", help="install a co-signed pending root file")
    p.add_argument("--key", action="append", metavar="KEYFILE", help="current root key to sign with (repeatable; required)")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of encrypted --key files (else a prompt on a TTY)")
    p.add_argument("--new-passphrase-file", action="append", metavar="[HOLDER=]FILE",
                   help="encrypt the new keys (of HOLDER, or every new key) with the passphrase in FILE (repeatable)")
    _add_role_counts(p, "default: unchanged")
    p.set_defaults(func=_command("authority", "cmd_authority_rotate_root"))

    node = sub.add_parser("node", help="enroll nodes and operators")
    nsub = node.add_subparsers(dest="cmd", required=True, parser_class=CliParser)
    p = nsub.add_parser("enroll", help="issue a certificate and write a ready node directory")
    p.add_argument("--authority", required=True, metavar="DIR")
    p.add_argument("--node-id", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--role", action="append", required=True, help="role (repeatable); 'operator' for an operator")
    p.add_argument("--address", action="append", default=[], metavar="IP", help="node address (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--valid", default="365d", help="certificate lifetime (default 365d)")
    p.add_argument("--port", type=int, default=DEFAULT_MESH_PORT, help="mesh port")
    p.add_argument("--listen", help="mesh listen HOST:PORT (default: first address and --port)")
    p.add_argument("--admin-listen", help=f"admin listener (default 127.0.0.1:{DEFAULT_ADMIN_PORT})")
    p.add_argument("--seed", action="append", metavar="HOST:PORT", help="seed peer (repeatable)")
    p.add_argument("--backend", default="nftables", choices=["nftables", "iptables", "file"],
                   help="enforcement backend written to node.toml (file = enforce nothing, an override)")
    p.add_argument("--key", action="append", metavar="KEYFILE",
                   help="enroll key to sign with (repeatable; required: no key is used unless it is named)")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of encrypted --key files (else a prompt on a TTY)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_command("authority", "cmd_node_enroll"))

    pol = sub.add_parser("policy", help="sign, co-sign, verify, inspect and publish policy versions")
    psub = pol.add_subparsers(dest="cmd", required=True, parser_class=CliParser)
    p = psub.add_parser("sign", help="sign a policy TOML into a policy version")
    p.add_argument("policy", metavar="POLICY.toml")
    p.add_argument("--authority", required=True, metavar="DIR")
    p.add_argument("--serial", type=int, help="serial (default: last signed + 1; never reused)")
    p.add_argument("--expires", default="7d", help="validity (e.g. 7d, 12h, 30s; default 7d)")
    p.add_argument("--key", action="append", metavar="KEYFILE",
                   help="policy key to sign with (repeatable; required: no key is used unless named)")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of encrypted --key files (else a prompt on a TTY)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=_command("policy", "cmd_policy_sign"))
    p = psub.add_parser("cosign", help="add a key holder's signature to a signed file (m-of-n)")
    p.add_argument("file")
    p.add_argument("--key", action="append", required=True, metavar="KEYFILE")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of encrypted --key files (else a prompt on a TTY)")
    p.set_defaults(func=_command("policy", "cmd_policy_cosign"))
    p = psub.add_parser("verify", help="exit 0 only for a valid policy under the given root")
    p.add_argument("file")
    p.add_argument("--root", required=True, metavar="ROOTFILE", help="trust anchor (root metadata)")
    p.add_argument("--state", metavar="DIR", help="a node's state (or node) directory: also check rollback")
    p.add_argument("--clock-skew", type=int, default=300, metavar="SECONDS", help="tolerated clock skew (default 300)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (also when invalid)")
    p.set_defaults(func=_command("policy", "cmd_policy_verify"))
    p = psub.add_parser("inspect", help="show what a signed policy, root or certificate says")
    p.add_argument("file")
    p.add_argument("--root", metavar="ROOTFILE", help="count valid signatures against this root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_command("policy", "cmd_policy_inspect"))
    mesh.register(sub, psub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from protocol.errors import MeshError

        if not isinstance(exc, MeshError | OSError | ValueError):
            raise
        msg = str(exc) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.strerror:
            msg = f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
        print(f"meshctl: error: {msg}", file=sys.stderr)
        return exit_code(exc)
    sys.stdout.flush()
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
