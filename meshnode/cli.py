"""meshctl: the operator's tool (authority, enrollment, signing, and talking to a running mesh).

Every command has --help; errors are one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from protocol.authority import build_policy, sign_certificate, sign_policy, x25519_public
from protocol.errors import MeshError, PolicyError, TrustError
from protocol.metadata import (
    ROLE_NAMES,
    Certificate,
    decode_certificate,
    decode_policy,
    decode_root,
    encode,
    payload_hash,
)
from protocol.names import NAME_RULE, is_name
from protocol.policy import parse_policy_toml, to_toml
from protocol.signing import add_signature, decode_envelope, encode_envelope, public_key_of, valid_signers
from protocol.trust import TrustedState

from . import version_string
from .authority_store import (
    ROOT_FILE,
    ROOT_NAME_RE,
    AuthorityDir,
    CliError,
    new_cert_id,
    new_node_keys,
    parse_duration,
    read_key,
    write_key,
)
from .config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_MESH_PORT,
    ConfigError,
    LoadedConfig,
    NodeConfig,
    render_config,
    validate,
)
from .fsutil import atomic_write, write_secret
from .state import StateStore

EXIT_INVALID = 1
EXIT_USAGE = 2


def _now() -> int:
    return int(time.time())


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _read(path: str | Path, what: str, limit: int = 4 << 20) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > limit:
            raise CliError(f"{p}: {what} is larger than {limit} bytes")
        return p.read_bytes()
    except OSError as exc:
        raise CliError(f"{p}: cannot read {what}: {exc.strerror or exc}") from None


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


# -- authority --------------------------------------------------------------------------------------


def _counts(args: argparse.Namespace, roles: Sequence[str], only_given: bool = False) -> dict[str, tuple[int, int]]:
    out = {}
    for role in roles:
        n = getattr(args, f"{role}_keys")
        t = getattr(args, f"{role}_threshold")
        if only_given and n is None and t is None:
            continue
        n = 1 if n is None else n
        t = (1 if n == 1 else (n // 2 + 1)) if t is None else t
        if n < 1 or not 1 <= t <= n:
            raise CliError(f"--{role}-keys {n} --{role}-threshold {t}: need 1 <= threshold <= keys")
        out[role] = (n, t)
    return out


def cmd_authority_init(args: argparse.Namespace) -> int:
    if not is_name(args.cluster):
        raise CliError(f"--cluster {args.cluster!r}: {NAME_RULE}")
    adir = AuthorityDir(args.dir)
    root = adir.init(args.cluster, _counts(args, ROLE_NAMES), _now(), parse_duration(args.expires))
    _out(f"authority for cluster {root.cluster!r} created in {adir.path}")
    _out(f"  trust anchor (pin this on nodes): {adir.path / ROOT_FILE}")
    for role in ROLE_NAMES:
        r = root.roles[role]
        _out(f"  {role:7s} {r.threshold}-of-{len(r.keyids)} keys in {adir.secrets}/{role}-1-*.key (mode 0600)")
    _out(f"  root v{root.version} expires {_fmt_time(root.expires)}")
    _out("Hand each key file to its holder; keep root keys offline.")
    return 0


def cmd_authority_show(args: argparse.Namespace) -> int:
    adir = AuthorityDir(args.dir)
    adir.require()
    root = adir.root()
    meta = adir.meta()
    present = {k.key_id for k in adir.keys()}
    info = {
        "cluster": root.cluster,
        "root_version": root.version,
        "root_expires": _fmt_time(root.expires),
        "last_serial": meta.get("last_serial", 0),
        "roles": {
            name: {
                "threshold": role.threshold,
                "keys": [{"key_id": k, "private_key_here": k in present} for k in role.keyids],
            }
            for name, role in root.roles.items()
        },
    }
    if args.json:
        _out(json.dumps(info, indent=2))
        return 0
    _out(f"cluster {root.cluster}  root v{root.version}  expires {info['root_expires']}  last serial {info['last_serial']}")
    for name, r in info["roles"].items():
        _out(f"  {name:7s} threshold {r['threshold']} of {len(r['keys'])}")
        for k in r["keys"]:
            _out(f"    {k['key_id']}  {'(private key here)' if k['private_key_here'] else ''}")
    return 0


def cmd_authority_rotate_root(args: argparse.Namespace) -> int:
    adir = AuthorityDir(args.dir)
    adir.require()
    if args.finish:
        data = _read(args.finish, "root file")
        return _install_pending_root(adir, data)
    roles = args.rotate or []
    for r in roles:
        if r not in ROLE_NAMES:
            raise CliError(f"--rotate {r!r}: one of {', '.join(ROLE_NAMES)}")
    counts = _counts(args, ROLE_NAMES, only_given=True)
    new_root, data, old_ok, new_ok = adir.rotate(roles, counts, _now(), parse_duration(args.expires))
    cur = adir.root()
    need_old, need_new = cur.roles["root"].threshold, new_root.roles["root"].threshold
    if old_ok >= need_old and new_ok >= need_new:
        adir.install_root(new_root.version, data)
        if "policy" in roles:
            # New policy keys reset the serial floor on nodes (fast-forward recovery); so does the authority.
            meta = adir.meta()
            meta["last_serial"] = 0
            adir.save_meta(meta)
            _out("policy keys replaced: serials start again at 1 (nodes that trust the new root accept them)")
        _out(f"root v{new_root.version} installed (signed {old_ok}/{need_old} old, {new_ok}/{need_new} new root keys)")
        _out(f"rotated roles: {', '.join(roles) or 'none (expiry/threshold refresh)'}; publish {adir.path / ROOT_FILE}"
             " to nodes, or let them fetch it over the mesh")
        return 0
    pending = adir.path / f"root.{new_root.version}.pending.msgpack"
    atomic_write(pending, data)
    _out(f"root v{new_root.version} written to {pending}: {old_ok}/{need_old} old and {new_ok}/{need_new} new root signatures")
    _out(f"have other root key holders run `meshctl policy cosign {pending} --key THEIR.key`, then "
         f"`meshctl authority rotate-root {adir.path} --finish {pending}`")
    return 3


def _install_pending_root(adir: AuthorityDir, data: bytes) -> int:
    trust = TrustedState(adir.chain()[0])
    trust.update_root_chain(adir.chain()[1:])
    trust.update_root(data)  # raises with the reason when thresholds are not met
    root = trust.root
    adir.install_root(root.version, data)
    _out(f"root v{root.version} installed")
    return 0


# -- enrollment -------------------------------------------------------------------------------------


def _node_config(out: Path, **fields: Any) -> str:
    """The node.toml for ``fields``, read back the way the daemon reads it: a value that does not survive
    the round trip as given (a quote, a newline, a bad HOST:PORT) is refused instead of written."""
    text = render_config(**fields)
    try:
        cfg = msgspec.convert(tomllib.loads(text), NodeConfig)
        validate(LoadedConfig(path=out / "node.toml", base=out, cfg=cfg))
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise CliError(f"these values cannot be written into node.toml: {exc}") from None
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    got = {
        "cluster": cfg.cluster, "node_id": cfg.node.id, "region": cfg.node.region, "listen": cfg.mesh.listen,
        "advertise": cfg.mesh.advertise, "seeds": list(cfg.mesh.seeds), "admin_listen": cfg.admin.listen,
        "backend": cfg.enforce.backend, "allow_file_backend": cfg.overrides.allow_file_backend,
    }
    for key, value in fields.items():
        if got[key] != value:
            raise CliError(f"{key} {value!r} cannot be written into node.toml as given")
    return text


def cmd_node_enroll(args: argparse.Namespace) -> int:
    adir = AuthorityDir(args.authority)
    adir.require()
    root = adir.root()
    if not is_name(args.node_id):
        raise CliError(f"--node-id {args.node_id!r}: {NAME_RULE}")
    if not is_name(args.region):
        raise CliError(f"--region {args.region!r}: {NAME_RULE}")
    roles = list(dict.fromkeys(args.role))
    for r in roles:
        if not is_name(r):
            raise CliError(f"--role {r!r}: {NAME_RULE}")
    out = Path(args.out)
    if (out / "node.cert").exists() or (out / "secrets").exists():
        raise CliError(f"{out}: already holds an identity; refusing to overwrite it")
    seeds = adir.role_seeds(root, "enroll")
    threshold = root.roles["enroll"].threshold
    if len(seeds) < threshold:
        raise CliError(f"{adir.path}: {len(seeds)} enroll key(s) here, threshold is {threshold}")
    identity, static = new_node_keys()
    now = _now()
    cert = Certificate(
        cluster=root.cluster,
        node_id=args.node_id,
        region=args.region,
        roles=tuple(roles),
        addresses=tuple(args.address),
        identity_key=public_key_of(identity),
        static_key=x25519_public(static),
        not_before=now - 300,
        not_after=now + parse_duration(args.valid),
        cert_id=new_cert_id(),
    )
    try:
        decode_certificate(encode(cert))  # validates addresses, names
    except TrustError as exc:
        raise CliError(str(exc)) from None
    port = args.port
    addr = args.address[0] if args.address else "127.0.0.1"
    host = f"[{addr}]" if ":" in addr else addr
    operator = "operator" in roles
    # Checked before anything is signed: never a certificate whose node.toml check-config refuses.
    config = None if operator else _node_config(
        out,
        cluster=root.cluster,
        node_id=args.node_id,
        region=args.region,
        listen=args.listen or f"{host}:{port}",
        advertise=f"{host}:{port}",
        seeds=list(args.seed or []),
        admin_listen=args.admin_listen or f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
        backend=args.backend,
        allow_file_backend=args.backend == "file",
    )
    cert_bytes = sign_certificate(cert, seeds[:threshold])
    out.mkdir(parents=True, exist_ok=True)
    write_key(out / "secrets" / "identity.key", "identity", identity)
    write_secret(out / "secrets" / "static.key", static.hex().encode() + b"\n")
    atomic_write(out / "node.cert", cert_bytes)
    atomic_write(out / ROOT_FILE, adir.root_bytes())
    if config is not None:
        atomic_write(out / "node.toml", config.encode())
    _out(f"enrolled {args.node_id} (region {args.region}, roles {', '.join(roles)}) in {out}")
    _out(f"  cert_id {cert.cert_id}, valid until {_fmt_time(cert.not_after)}")
    if not operator:
        _out(f"  start it with: meshnode run --config {out / 'node.toml'}")
    return 0


# -- policy -----------------------------------------------------------------------------------------


def _trust_for(root_path: str, state_dir: str | None, now: float, skew_s: int = 300) -> TrustedState:
    trust = TrustedState(_read(root_path, "root metadata"), skew_s=skew_s)
    rp = Path(root_path)
    chain_dir = rp.parent / "roots"
    if chain_dir.is_dir():  # an authority directory: follow its root chain
        chain = [(int(m.group(1)), p) for p in chain_dir.glob("root.*.msgpack") if (m := ROOT_NAME_RE.fullmatch(p.name))]
        for version, p in sorted(chain):
            if version > trust.root_version:
                trust.update_root(p.read_bytes())
    if state_dir:
        sd = Path(state_dir)
        store = StateStore(sd / "state" if (sd / "state").is_dir() else sd)
        store.load_into(trust, now, clean_temps=False)  # read-only: a running daemon owns the directory
    return trust


def cmd_policy_sign(args: argparse.Namespace) -> int:
    adir = AuthorityDir(args.authority)
    adir.require()
    meta = adir.meta()
    root = adir.root()
    try:
        text = Path(args.policy).read_text()
    except OSError as exc:
        raise CliError(f"{args.policy}: cannot read: {exc.strerror or exc}") from None
    try:
        doc, rev = parse_policy_toml(text)
    except PolicyError as exc:
        raise CliError(f"{args.policy}: {exc}") from None
    last = int(meta.get("last_serial", 0))
    serial = last + 1 if args.serial is None else args.serial
    if serial <= last:
        raise CliError(f"serial {serial} was already used (last signed serial is {last}); serials never repeat")
    now = _now()
    pv = build_policy(root.cluster, serial, now, now + parse_duration(args.expires), root.version, doc, rev)
    if args.key:
        keys = [read_key(k) for k in args.key]
        for k in keys:
            if k.role != "policy" or k.key_id not in root.roles["policy"].keyids:
                raise CliError(f"{k.path}: not a policy key of root v{root.version}")
        seeds = [k.seed for k in keys]
    else:
        seeds = adir.role_seeds(root, "policy")
    if not seeds:
        raise CliError(f"{adir.path}: no policy key here; pass --key KEYFILE")
    data = sign_policy(pv, seeds)
    meta["last_serial"] = serial
    adir.save_meta(meta)  # before writing the file: a serial is never handed out twice
    atomic_write(Path(args.out), data)
    n, t = len(seeds), root.roles["policy"].threshold
    _out(f"signed policy serial {serial} ({len(pv.document.allow)} rules) -> {args.out}: {n} signature(s), threshold {t}, "
         f"expires {_fmt_time(pv.expires_at)}")
    if n < t:
        _out(f"needs {t - n} more: `meshctl policy cosign {args.out} --key KEYFILE`")
    return 0


def cmd_policy_cosign(args: argparse.Namespace) -> int:
    data = _read(args.file, "signed file")
    kind = _envelope_kind(data)
    env = decode_envelope(data, kind)
    before = len(env.signatures)
    for kp in args.key:
        env = add_signature(env, read_key(kp).seed)
    atomic_write(Path(args.file), encode_envelope(env))
    _out(f"{args.file}: {len(env.signatures) - before} signature(s) added, {len(env.signatures)} in total")
    return 0


def _envelope_kind(data: bytes) -> str:
    try:
        kind = msgspec.msgpack.decode(data, type=dict).get("type") if len(data) < (4 << 20) else None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        kind = None
    if kind not in ("root", "policy", "cert"):
        raise CliError("not a policymesh signed file (expected a signed policy, root or certificate)")
    return str(kind)


def cmd_policy_verify(args: argparse.Namespace) -> int:
    now = _now()
    data = _read(args.file, "policy file")
    try:
        trust = _trust_for(args.root, args.state, now, args.clock_skew)
        check = trust.check_policy(data, now)
    except TrustError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return EXIT_INVALID
    root = trust.root
    env = decode_envelope(data, "policy")
    good = valid_signers(env, root.keys, root.role_keys("policy"))
    pv = check.policy
    dup = " (the same version the state already holds)" if check.duplicate else ""
    _out(
        f"valid: serial {pv.serial}, {len(good)} valid signature(s) (threshold {root.roles['policy'].threshold}), "
        f"root v{pv.root_version}, "
        f"expires {_fmt_time(pv.expires_at)}, hash {check.hash[:16]}{dup}"
    )
    return 0


def cmd_policy_inspect(args: argparse.Namespace) -> int:
    data = _read(args.file, "signed file")
    kind = _envelope_kind(data)
    env = decode_envelope(data, kind)
    info: dict = {"type": kind, "hash": payload_hash(env.payload), "signatures": [s.key_id for s in env.signatures]}
    if kind == "policy":
        pv = decode_policy(env.payload)
        info.update(
            serial=pv.serial, cluster=pv.cluster, issued_at=_fmt_time(pv.issued_at),
            expires_at=_fmt_time(pv.expires_at), root_version=pv.root_version,
            rules=len(pv.document.allow), revoked_nodes=list(pv.revocations.nodes),
            revoked_certs=list(pv.revocations.certs), document=to_toml(pv.document, pv.revocations),
        )
    elif kind == "root":
        root = decode_root(env.payload)
        info.update(cluster=root.cluster, version=root.version, expires=_fmt_time(root.expires),
                    roles={n: {"threshold": r.threshold, "keys": list(r.keyids)} for n, r in root.roles.items()})
    else:
        cert = decode_certificate(env.payload)
        info.update(cluster=cert.cluster, node_id=cert.node_id, region=cert.region, roles=list(cert.roles),
                    addresses=list(cert.addresses), cert_id=cert.cert_id, not_before=_fmt_time(cert.not_before),
                    not_after=_fmt_time(cert.not_after))
    if args.root:
        trust = _trust_for(args.root, None, _now())
        role = {"policy": "policy", "root": "root", "cert": "enroll"}[kind]
        r = trust.root
        info["valid_signatures"] = len(valid_signers(env, r.keys, r.role_keys(role)))
        info["threshold"] = r.roles[role].threshold
    if args.json:
        _out(json.dumps(info, indent=2))
        return 0
    doc = info.pop("document", None)
    for k, v in info.items():
        if k == "signatures":
            v = f"{len(v)} ({', '.join(x[:12] for x in v)})"
        _out(f"{k:16s} {v}")
    if doc:
        _out("")
        _out(doc.rstrip())
    return 0


# -- parser -----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_role_counts(p: argparse.ArgumentParser, default_text: str) -> None:
    for role in ROLE_NAMES:
        p.add_argument(f"--{role}-keys", type=int, metavar="N", help=f"number of {role} keys ({default_text})")
        p.add_argument(f"--{role}-threshold", type=int, metavar="M", help=f"signatures required of {role} keys")


def build_parser(extra: Callable[[argparse._SubParsersAction, argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="meshctl", description="policymesh operator tool: authority, enrollment, signed policy, "
                     "and the running mesh.")
    parser.add_argument("--version", action="version", version=version_string("meshctl"))
    sub = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    auth = sub.add_parser("authority", help="create and manage the signing authority")
    asub = auth.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = asub.add_parser("init", help="create an authority: root, policy and enroll keys and root v1")
    p.add_argument("dir", help="authority directory to create")
    p.add_argument("--cluster", default="policymesh", help="cluster name bound into every signature and channel")
    p.add_argument("--expires", default="365d", help="root expiry (e.g. 365d)")
    _add_role_counts(p, "default 1")
    p.set_defaults(func=cmd_authority_init)
    p = asub.add_parser("show", help="show the current root: roles, key ids, thresholds, expiry")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_authority_show)
    p = asub.add_parser("rotate-root", help="make root N+1 (new keys for --rotate roles), signed by old and new root keys")
    p.add_argument("dir")
    p.add_argument("--rotate", action="append", metavar="ROLE", help="replace this role's keys (repeatable)")
    p.add_argument("--expires", default="365d")
    p.add_argument("--finish", metavar="FILE", help="install a co-signed pending root file")
    _add_role_counts(p, "default: unchanged")
    p.set_defaults(func=cmd_authority_rotate_root)

    node = sub.add_parser("node", help="enroll nodes and operators")
    nsub = node.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
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
    p.set_defaults(func=cmd_node_enroll)

    pol = sub.add_parser("policy", help="sign, co-sign, verify, inspect and publish policy versions")
    psub = pol.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = psub.add_parser("sign", help="sign a policy TOML into a policy version")
    p.add_argument("policy", metavar="POLICY.toml")
    p.add_argument("--authority", required=True, metavar="DIR")
    p.add_argument("--serial", type=int, help="serial (default: last signed + 1; never reused)")
    p.add_argument("--expires", default="7d", help="validity (e.g. 7d, 12h, 30s; default 7d)")
    p.add_argument("--key", action="append", metavar="KEYFILE", help="sign with this policy key only (repeatable)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_policy_sign)
    p = psub.add_parser("cosign", help="add a key holder's signature to a signed file (m-of-n)")
    p.add_argument("file")
    p.add_argument("--key", action="append", required=True, metavar="KEYFILE")
    p.set_defaults(func=cmd_policy_cosign)
    p = psub.add_parser("verify", help="exit 0 only for a valid policy under the given root")
    p.add_argument("file")
    p.add_argument("--root", required=True, metavar="ROOTFILE", help="trust anchor (root metadata)")
    p.add_argument("--state", metavar="DIR", help="a node's state (or node) directory: also check rollback")
    p.add_argument("--clock-skew", type=int, default=300, metavar="SECONDS", help="tolerated clock skew (default 300)")
    p.set_defaults(func=cmd_policy_verify)
    p = psub.add_parser("inspect", help="show what a signed policy, root or certificate says")
    p.add_argument("file")
    p.add_argument("--root", metavar="ROOTFILE", help="count valid signatures against this root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_inspect)
    if extra is not None:
        extra(sub, psub)
    return parser


def _extra_commands(sub: argparse._SubParsersAction, policy_sub: argparse._SubParsersAction) -> None:
    """Commands that talk to a running mesh (policy publish, status, demo) live in meshnode.opscli."""
    try:
        from .opscli import register
    except ImportError:
        return
    register(sub, policy_sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_extra_commands)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (MeshError, OSError, ValueError) as exc:
        msg = str(exc) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.strerror:
            msg = f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
        print(f"meshctl: error: {msg}", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.flush()
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
