"""What the authority issues into files: a new authority, an enrolled node or operator directory, and
the next signed policy version. ``meshctl`` and the demo both call these."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from protocol.errors import TrustError
from protocol.trust import (
    Certificate,
    PolicyDocument,
    PolicyVersion,
    Revocations,
    Root,
    build_policy,
    decode_certificate,
    encode,
    public_key_of,
    sign_certificate,
    sign_policy,
    x25519_public,
)
from protocol.trust.names import NAME_RULE, is_name

from .authority_store import (
    ROOT_FILE,
    AuthorityDir,
    CliError,
    KeyFile,
    NewPassphrases,
    new_cert_id,
    new_node_keys,
    write_key,
)
from .config import ConfigError, LoadedConfig, NodeConfig, render_config, validate
from .fsutil import atomic_write, write_secret

CERT_BACKDATE_S = 300
"""A new certificate is valid from five minutes ago: a node whose clock lags a little accepts it."""


def init_authority(path: Path, cluster: str, counts: dict[str, tuple[int, int]], now: int, expires_s: int,
                   holders: list[str] | None = None,
                   passphrases: NewPassphrases | None = None) -> tuple[AuthorityDir, Root]:
    """Create an authority directory: root, policy and enroll keys (``counts``: role -> (keys, threshold)),
    per holder and encrypted when asked (see :meth:`AuthorityDir.init`), and root v1, for ``cluster``."""
    if not is_name(cluster):
        raise CliError(f"--cluster {cluster!r}: {NAME_RULE}")
    authority = AuthorityDir(path)
    return authority, authority.init(cluster, counts, now, expires_s, holders, passphrases)


@dataclass(frozen=True)
class NodeSettings:
    """What an enrolled node's node.toml says beyond its identity (see :func:`meshnode.config.render_config`)."""

    listen: str
    advertise: str
    seeds: list[str]
    admin_listen: str
    backend: str = "nftables"
    allow_file_backend: bool = False
    source_address: str = ""
    gossip: dict[str, int] = field(default_factory=dict)


def node_config(out: Path, cluster: str, node_id: str, region: str, settings: NodeSettings) -> str:
    """The node.toml for these values, read back the way the daemon reads it: a value that does not
    survive the round trip as given (a quote, a newline, a bad HOST:PORT) is refused instead of written."""
    fields = dict(cluster=cluster, node_id=node_id, region=region, **asdict(settings))
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
        "source_address": cfg.mesh.source_address, "gossip": dict(cfg.gossip),
    }
    for key, value in fields.items():
        if got[key] != value:
            raise CliError(f"{key} {value!r} cannot be written into node.toml as given")
    return text


def enroll(authority: AuthorityDir, *, node_id: str, region: str, roles: list[str], addresses: list[str],
           out: Path, valid_s: int, now: int, settings: NodeSettings | None,
           keys: list[KeyFile]) -> Certificate:
    """Issue a certificate and write a ready directory to ``out``: keys (mode 0600), the certificate,
    the trust anchor and, for a node (``settings`` given; None for an operator), its node.toml. Every
    value is checked before anything is signed. The certificate is signed with the enroll ``keys`` named
    by the caller, and with no other key."""
    authority.require()
    root = authority.root()
    if not is_name(node_id):
        raise CliError(f"--node-id {node_id!r}: {NAME_RULE}")
    if not is_name(region):
        raise CliError(f"--region {region!r}: {NAME_RULE}")
    roles = list(dict.fromkeys(roles))
    for r in roles:
        if not is_name(r):
            raise CliError(f"--role {r!r}: {NAME_RULE}")
    if (out / "node.cert").exists() or (out / "secrets").exists():
        raise CliError(f"{out}: already holds an identity; refusing to overwrite it")
    seeds = _role_seeds(keys, root, "enroll")
    threshold = root.roles["enroll"].threshold
    if len(seeds) < threshold:
        raise CliError(f"{len(seeds)} enroll key(s) given, threshold is {threshold}; pass --key KEYFILE per holder")
    identity, static = new_node_keys()
    cert = Certificate(
        cluster=root.cluster,
        node_id=node_id,
        region=region,
        roles=tuple(roles),
        addresses=tuple(addresses),
        identity_key=public_key_of(identity),
        static_key=x25519_public(static),
        not_before=now - CERT_BACKDATE_S,
        not_after=now + valid_s,
        cert_id=new_cert_id(),
    )
    try:
        decode_certificate(encode(cert))  # validates addresses, names
    except TrustError as exc:
        raise CliError(str(exc)) from None
    # Checked before anything is signed: never a certificate whose node.toml check-config refuses.
    config = None if settings is None else node_config(out, root.cluster, node_id, region, settings)
    cert_bytes = sign_certificate(cert, seeds[:threshold])
    out.mkdir(parents=True, exist_ok=True)
    write_key(out / "secrets" / "identity.key", "identity", identity)
    write_secret(out / "secrets" / "static.key", static.hex().encode() + b"\n")
    atomic_write(out / "node.cert", cert_bytes)
    atomic_write(out / ROOT_FILE, authority.root_bytes())
    if config is not None:
        atomic_write(out / "node.toml", config.encode())
    return cert


@dataclass(frozen=True)
class SignedPolicy:
    version: PolicyVersion
    envelope: bytes
    signatures: int
    threshold: int


def sign_next_policy(authority: AuthorityDir, document: PolicyDocument, revocations: Revocations, *, now: int,
                     expires_s: int, keys: list[KeyFile], serial: int | None = None) -> SignedPolicy:
    """Sign ``document`` as the next policy version (``serial``: default the last signed + 1; a serial is
    never used twice) with exactly the policy ``keys`` given. The new last serial is saved before the
    envelope is returned, so a serial is never handed out twice."""
    authority.require()
    meta = authority.meta()
    root = authority.root()
    last = int(meta.get("last_serial", 0))
    serial = last + 1 if serial is None else serial
    if serial <= last:
        raise CliError(f"serial {serial} was already used (last signed serial is {last}); serials never repeat")
    version = build_policy(root.cluster, serial, now, now + expires_s, root.version, document, revocations)
    if not keys:
        raise CliError("name the policy key(s) to sign with: --key KEYFILE (repeatable)")
    seeds = _role_seeds(keys, root, "policy")
    envelope = sign_policy(version, seeds)
    meta["last_serial"] = serial
    authority.save_meta(meta)
    return SignedPolicy(version, envelope, len(seeds), root.roles["policy"].threshold)


def _role_seeds(keys: list[KeyFile], root: Root, role: str) -> list[bytes]:
    """The seeds of ``keys``, each checked to be a ``role`` key of ``root`` (a key given twice counts once)."""
    for k in keys:
        if k.role != role or k.key_id not in root.roles[role].keyids:
            raise CliError(f"{k.path}: not a {role} key of root v{root.version}")
    return list(dict.fromkeys(k.seed for k in keys))
