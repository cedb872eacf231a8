"""meshctl commands of the authority: ``authority init|show|rotate-root`` and ``node enroll``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from protocol.trust import ROLE_NAMES, Root, TrustedState

from ..authority_store import ROOT_FILE, AuthorityDir, CliError, parse_duration
from ..config import DEFAULT_ADMIN_PORT
from ..fsutil import atomic_write
from ..issuing import NodeSettings, enroll, init_authority
from .common import fmt_time, new_key_passphrases, now, out, read, signing_keys

EXIT_PENDING = 4
"""rotate-root wrote a pending root that needs more root signatures (3 is "unreadable input")."""


def role_counts(args: argparse.Namespace, roles: Sequence[str], only_given: bool = False) -> dict[str, tuple[int, int]]:
    """(keys, threshold) per role from --ROLE-keys/--ROLE-threshold; the threshold defaults to a majority."""
    counts = {}
    for role in roles:
        n = getattr(args, f"{role}_keys")
        t = getattr(args, f"{role}_threshold")
        if only_given and n is None and t is None:
            continue
        n = 1 if n is None else n
        t = (1 if n == 1 else (n // 2 + 1)) if t is None else t
        if n < 1 or not 1 <= t <= n:
            raise CliError(f"--{role}-keys {n} --{role}-threshold {t}: need 1 <= threshold <= keys")
        counts[role] = (n, t)
    return counts


def cmd_authority_init(args: argparse.Namespace) -> int:
    holders = [h.strip() for h in args.holders.split(",")] if args.holders else []
    passphrases = new_key_passphrases(args.passphrase_file)
    authority, root = init_authority(Path(args.dir), args.cluster, role_counts(args, ROLE_NAMES), now(),
                                     parse_duration(args.expires), holders, passphrases)
    out(f"authority for cluster {root.cluster!r} created in {authority.path}")
    out(f"  trust anchor (pin this on nodes): {authority.path / ROOT_FILE}")
    where = f"{authority.secrets}/HOLDER" if holders else str(authority.secrets)
    for role in ROLE_NAMES:
        r = root.roles[role]
        out(f"  {role:7s} {r.threshold}-of-{len(r.keyids)} keys in {where}/{role}-1-*.key (mode 0600)")
    for i, holder in enumerate(holders, 1):
        encrypted = "encrypted" if passphrases.get(holder, passphrases.get(None)) else "PLAINTEXT"
        out(f"  holder {holder}: key {i} of each role in {authority.secrets / holder} ({encrypted})")
    if not holders:
        out(f"  keys are {'encrypted' if passphrases else 'PLAINTEXT'}")
    out(f"  root v{root.version} expires {fmt_time(root.expires)}")
    out("Hand each key file to its holder; keep root keys offline.")
    return 0


def cmd_authority_show(args: argparse.Namespace) -> int:
    authority = AuthorityDir(args.dir)
    authority.require()
    root = authority.root()
    meta = authority.meta()
    present = authority.key_ids_here()
    info = {
        "cluster": root.cluster,
        "root_version": root.version,
        "root_expires": fmt_time(root.expires),
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
        out(json.dumps(info, indent=2))
        return 0
    out(f"cluster {root.cluster}  root v{root.version}  expires {info['root_expires']}  last serial {info['last_serial']}")
    for name, r in info["roles"].items():
        out(f"  {name:7s} threshold {r['threshold']} of {len(r['keys'])}")
        for k in r["keys"]:
            out(f"    {k['key_id']}  {'(private key here)' if k['private_key_here'] else ''}")
    return 0


def cmd_authority_rotate_root(args: argparse.Namespace) -> int:
    authority = AuthorityDir(args.dir)
    authority.require()
    if args.finish:
        return _install_pending_root(authority, read(args.finish, "root file"))
    roles = args.rotate or []
    for r in roles:
        if r not in ROLE_NAMES:
            raise CliError(f"--rotate {r!r}: one of {', '.join(ROLE_NAMES)}")
    counts = role_counts(args, ROLE_NAMES, only_given=True)
    signers = signing_keys(args.key, args.passphrase_file, "current root")
    new_root, data, old_ok, new_ok = authority.rotate(roles, counts, now(), parse_duration(args.expires), signers,
                                                      new_key_passphrases(args.new_passphrase_file))
    current = authority.root()
    need_old, need_new = current.roles["root"].threshold, new_root.roles["root"].threshold
    if old_ok >= need_old and new_ok >= need_new:
        _install(authority, current, new_root, data)
        out(f"root v{new_root.version} installed (signed {old_ok}/{need_old} old, {new_ok}/{need_new} new root keys)")
        out(f"rotated roles: {', '.join(roles) or 'none (expiry/threshold refresh)'}; publish "
            f"{authority.path / ROOT_FILE} to nodes, or let them fetch it over the mesh")
        return 0
    pending = authority.path / f"root.{new_root.version}.pending.msgpack"
    atomic_write(pending, data)
    out(f"root v{new_root.version} written to {pending}: {old_ok}/{need_old} old and {new_ok}/{need_new} new root signatures")
    out(f"have other root key holders run `meshctl policy cosign {pending} --key THEIR.key "
        f"[--passphrase-file THEIR.pass]`, then "
        f"`meshctl authority rotate-root {authority.path} --finish {pending}`")
    return EXIT_PENDING


def _install_pending_root(authority: AuthorityDir, data: bytes) -> int:
    trust = TrustedState(authority.chain()[0])
    trust.update_root_chain(authority.chain()[1:])
    current = trust.root
    trust.update_root(data)  # raises with the reason when thresholds are not met
    _install(authority, current, trust.root, data)
    out(f"root v{trust.root.version} installed")
    return 0


def _install(authority: AuthorityDir, current: Root, new_root: Root, data: bytes) -> None:
    authority.install_root(new_root.version, data)
    if set(new_root.roles["policy"].keyids) != set(current.roles["policy"].keyids):
        # New policy keys reset the serial floor on nodes (fast-forward recovery); so does the authority.
        meta = authority.meta()
        meta["last_serial"] = 0
        authority.save_meta(meta)
        out("policy keys replaced: serials start again at 1 (nodes that trust the new root accept them)")


def cmd_node_enroll(args: argparse.Namespace) -> int:
    authority = AuthorityDir(args.authority)
    authority.require()
    roles = list(dict.fromkeys(args.role))
    destination = Path(args.out)
    addr = args.address[0] if args.address else "127.0.0.1"
    host = f"[{addr}]" if ":" in addr else addr
    operator = "operator" in roles
    settings = None if operator else NodeSettings(
        listen=args.listen or f"{host}:{args.port}",
        advertise=f"{host}:{args.port}",
        seeds=list(args.seed or []),
        admin_listen=args.admin_listen or f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
        backend=args.backend,
        allow_file_backend=args.backend == "file",
    )
    keys = signing_keys(args.key, args.passphrase_file, "enroll")
    cert = enroll(authority, node_id=args.node_id, region=args.region, roles=roles, addresses=list(args.address),
                  out=destination, valid_s=parse_duration(args.valid), now=now(), settings=settings, keys=keys)
    if args.json:
        out(json.dumps({
            "node_id": args.node_id, "region": args.region, "roles": roles, "addresses": list(args.address),
            "cert_id": cert.cert_id, "not_after": fmt_time(cert.not_after), "directory": str(destination),
            "config": None if operator else str(destination / "node.toml"),
        }, indent=2))
        return 0
    out(f"enrolled {args.node_id} (region {args.region}, roles {', '.join(roles)}) in {destination}")
    out(f"  cert_id {cert.cert_id}, valid until {fmt_time(cert.not_after)}")
    if not operator:
        out(f"  start it with: meshnode run --config {destination / 'node.toml'}")
    return 0
