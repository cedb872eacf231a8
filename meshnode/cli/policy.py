"""meshctl commands on signed files: ``policy sign|cosign|verify|inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from protocol.errors import PolicyError, TrustError
from protocol.trust import (
    TrustedState,
    add_signature,
    decode_certificate,
    decode_envelope,
    decode_policy,
    decode_root,
    encode_envelope,
    parse_policy_toml,
    payload_hash,
    to_toml,
    valid_signers,
)

from ..authority_store import ROOT_NAME_RE, AuthorityDir, CliError, parse_duration
from ..fsutil import atomic_write
from ..issuing import sign_next_policy
from ..state import StateStore
from .common import EXIT_INVALID, READ_LIMIT_BYTES, fmt_time, now, out, read, signing_keys


def _trust_for(root_path: str, state_dir: str | None, at: float, skew_s: int = 300) -> TrustedState:
    trust = TrustedState(read(root_path, "root metadata"), skew_s=skew_s)
    chain_dir = Path(root_path).parent / "roots"
    if chain_dir.is_dir():  # an authority directory: follow its root chain
        chain = [(int(m.group(1)), p) for p in chain_dir.glob("root.*.msgpack") if (m := ROOT_NAME_RE.fullmatch(p.name))]
        for version, p in sorted(chain):
            if version > trust.root_version:
                trust.update_root(p.read_bytes())
    if state_dir:
        node_dir = Path(state_dir)
        store = StateStore(node_dir / "state" if (node_dir / "state").is_dir() else node_dir)
        store.load_into(trust, at, clean_temps=False)  # read-only: a running daemon owns the directory
    return trust


def cmd_policy_sign(args: argparse.Namespace) -> int:
    authority = AuthorityDir(args.authority)
    authority.require()
    keys = signing_keys(args.key, args.passphrase_file, "policy")
    try:
        text = read(args.policy, "policy TOML").decode()
    except UnicodeDecodeError:
        raise CliError(f"{args.policy}: not UTF-8 text") from None
    try:
        document, revocations = parse_policy_toml(text)
    except PolicyError as exc:
        raise CliError(f"{args.policy}: {exc}") from None
    signed = sign_next_policy(authority, document, revocations, now=now(), expires_s=parse_duration(args.expires),
                              serial=args.serial, keys=keys)
    atomic_write(Path(args.out), signed.envelope)
    version, n, t = signed.version, signed.signatures, signed.threshold
    out(f"signed policy serial {version.serial} ({len(version.document.allow)} rules) -> {args.out}: {n} signature(s), "
        f"threshold {t}, expires {fmt_time(version.expires_at)}")
    if n < t:
        out(f"needs {t - n} more: `meshctl policy cosign {args.out} --key KEYFILE`")
    return 0


def cmd_policy_cosign(args: argparse.Namespace) -> int:
    data = read(args.file, "signed file")
    env = decode_envelope(data, _envelope_kind(data))
    before = len(env.signatures)
    for key in signing_keys(args.key, args.passphrase_file, "signing"):
        env = add_signature(env, key.seed)
    atomic_write(Path(args.file), encode_envelope(env))
    out(f"{args.file}: {len(env.signatures) - before} signature(s) added, {len(env.signatures)} in total")
    return 0


def _envelope_kind(data: bytes) -> str:
    try:
        kind = msgspec.msgpack.decode(data, type=dict).get("type") if len(data) < READ_LIMIT_BYTES else None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        kind = None
    if kind not in ("root", "policy", "cert"):
        raise CliError("not a policymesh signed file (expected a signed policy, root or certificate)")
    return str(kind)


def cmd_policy_verify(args: argparse.Namespace) -> int:
    """Exit 0 for a valid policy, 1 for an invalid one, 3 when the policy or root cannot be read."""
    at = now()
    data = read(args.file, "policy file")
    try:
        trust = _trust_for(args.root, args.state, at, args.clock_skew)
        check = trust.check_policy(data, at)
    except TrustError as exc:
        if args.json:
            out(json.dumps({"valid": False, "file": args.file, "error": str(exc)}, indent=2))
        print(f"invalid: {exc}", file=sys.stderr)
        return EXIT_INVALID
    root = trust.root
    env = decode_envelope(data, "policy")
    good = valid_signers(env, root.keys, root.role_keys("policy"))
    version = check.policy
    if args.json:
        out(json.dumps({
            "valid": True, "file": args.file, "serial": version.serial, "valid_signatures": len(good),
            "threshold": root.roles["policy"].threshold, "root_version": version.root_version,
            "expires_at": fmt_time(version.expires_at), "hash": check.hash, "duplicate": check.duplicate,
        }, indent=2))
        return 0
    dup = " (the same version the state already holds)" if check.duplicate else ""
    out(
        f"valid: serial {version.serial}, {len(good)} valid signature(s) (threshold {root.roles['policy'].threshold}), "
        f"root v{version.root_version}, "
        f"expires {fmt_time(version.expires_at)}, hash {check.hash[:16]}{dup}"
    )
    return 0


def cmd_policy_inspect(args: argparse.Namespace) -> int:
    data = read(args.file, "signed file")
    kind = _envelope_kind(data)
    env = decode_envelope(data, kind)
    info: dict = {"type": kind, "hash": payload_hash(env.payload), "signatures": [s.key_id for s in env.signatures]}
    if kind == "policy":
        pv = decode_policy(env.payload)
        info.update(
            serial=pv.serial, cluster=pv.cluster, issued_at=fmt_time(pv.issued_at),
            expires_at=fmt_time(pv.expires_at), root_version=pv.root_version,
            rules=len(pv.document.allow), revoked_nodes=list(pv.revocations.nodes),
            revoked_certs=list(pv.revocations.certs), document=to_toml(pv.document, pv.revocations),
        )
    elif kind == "root":
        root = decode_root(env.payload)
        info.update(cluster=root.cluster, version=root.version, expires=fmt_time(root.expires),
                    roles={n: {"threshold": r.threshold, "keys": list(r.keyids)} for n, r in root.roles.items()})
    else:
        cert = decode_certificate(env.payload)
        info.update(cluster=cert.cluster, node_id=cert.node_id, region=cert.region, roles=list(cert.roles),
                    addresses=list(cert.addresses), cert_id=cert.cert_id, not_before=fmt_time(cert.not_before),
                    not_after=fmt_time(cert.not_after))
    if args.root:
        trust = _trust_for(args.root, None, now())
        role = {"policy": "policy", "root": "root", "cert": "enroll"}[kind]
        r = trust.root
        info["valid_signatures"] = len(valid_signers(env, r.keys, r.role_keys(role)))
        info["threshold"] = r.roles[role].threshold
    if args.json:
        out(json.dumps(info, indent=2))
        return 0
    doc = info.pop("document", None)
    for k, v in info.items():
        if k == "signatures":
            v = f"{len(v)} ({', '.join(x[:12] for x in v)})"
        out(f"{k:16s} {v}")
    if doc:
        out("")
        out(doc.rstrip())
    return 0
