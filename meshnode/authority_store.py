"""The authority directory on disk and the node directory `node enroll` writes.

    AUTH/authority.json        cluster name and the last signed serial (never reused)
    AUTH/root.msgpack          current root metadata: the public trust anchor nodes pin
    AUTH/roots/root.N.msgpack  every root version (nodes catch up through the chain)
    AUTH/secrets/ROLE-G-I.key  one private key per file (mode 0600), handable to its holder
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from protocol.authority import build_root, sign_root
from protocol.errors import MeshError
from protocol.metadata import ROLE_NAMES, Root, decode_root, encode
from protocol.signing import decode_envelope, encode_envelope, key_id, public_key_of, sign, valid_signers

from .fsutil import atomic_write, write_secret

ROOT_FILE = "root.msgpack"
KEY_RE = re.compile(r"\A(root|policy|enroll)-([0-9]+)-([0-9]+)\.key\Z", re.ASCII)
ROOT_NAME_RE = re.compile(r"\Aroot\.([0-9]{1,20})\.msgpack\Z", re.ASCII)
_DUR_RE = re.compile(r"\A([0-9]{1,12})([smhdw])\Z", re.ASCII)
_DUR_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class CliError(MeshError):
    """An operator-facing error: printed as one line, non-zero exit."""


def parse_duration(text: str) -> int:
    m = _DUR_RE.fullmatch(text.strip())
    if not m:
        raise CliError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    value = int(m.group(1)) * _DUR_UNITS[m.group(2)]
    if value <= 0:
        raise CliError(f"duration {text!r} must be positive")
    return value


@dataclass(frozen=True)
class KeyFile:
    role: str
    key_id: str
    seed: bytes
    path: Path


def write_key(path: Path, role: str, seed: bytes) -> KeyFile:
    kid = key_id(public_key_of(seed))
    body = json.dumps({"role": role, "key_id": kid, "ed25519_seed": seed.hex()}, indent=1).encode()
    write_secret(path, body + b"\n")
    return KeyFile(role, kid, seed, path)


def read_key(path: Path) -> KeyFile:
    try:
        raw = json.loads(Path(path).read_text())
        seed = bytes.fromhex(raw["ed25519_seed"])
        role = raw["role"]
    except OSError as exc:
        raise CliError(f"{path}: cannot read key: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError):
        raise CliError(f"{path}: not a policymesh key file") from None
    if len(seed) != 32 or role not in (*ROLE_NAMES, "identity"):
        raise CliError(f"{path}: not a policymesh key file")
    kid = key_id(public_key_of(seed))
    if raw.get("key_id") not in (None, kid):
        raise CliError(f"{path}: key id does not match the key")
    return KeyFile(role, kid, seed, Path(path))


class AuthorityDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.secrets = self.path / "secrets"
        self.roots = self.path / "roots"
        self.meta_path = self.path / "authority.json"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def require(self) -> None:
        if not self.exists():
            raise CliError(f"{self.path}: not an authority directory (run `meshctl authority init {self.path}`)")

    def meta(self) -> dict:
        self.require()
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"{self.meta_path}: unreadable: {exc}") from None

    def save_meta(self, meta: dict) -> None:
        atomic_write(self.meta_path, json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n")

    def root_bytes(self) -> bytes:
        try:
            return (self.path / ROOT_FILE).read_bytes()
        except OSError as exc:
            raise CliError(f"{self.path / ROOT_FILE}: {exc.strerror or exc}") from None

    def root(self) -> Root:
        return decode_root(decode_envelope(self.root_bytes(), "root").payload)

    def chain(self) -> list[bytes]:
        files = sorted(
            (int(m.group(1)), p) for p in self.roots.glob("root.*.msgpack") if (m := ROOT_NAME_RE.fullmatch(p.name))
        )
        return [p.read_bytes() for _, p in files]

    def keys(self, role: str | None = None) -> list[KeyFile]:
        out = []
        if self.secrets.is_dir():
            for p in sorted(self.secrets.iterdir()):
                if KEY_RE.fullmatch(p.name):
                    k = read_key(p)
                    if role is None or k.role == role:
                        out.append(k)
        return out

    def role_seeds(self, root: Root, role: str) -> list[bytes]:
        """Seeds present on this machine for keys the root lists for ``role``."""
        wanted = set(root.roles[role].keyids)
        return [k.seed for k in self.keys(role) if k.key_id in wanted]

    def install_root(self, version: int, data: bytes) -> None:
        atomic_write(self.roots / f"root.{version}.msgpack", data)
        atomic_write(self.path / ROOT_FILE, data)

    def init(
        self,
        cluster: str,
        counts: dict[str, tuple[int, int]],
        now: int,
        expires_s: int,
    ) -> Root:
        if self.exists() or (self.path / ROOT_FILE).exists():
            raise CliError(f"{self.path}: already holds an authority; refusing to overwrite it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        pubs: dict[str, list[bytes]] = {}
        seeds: dict[str, list[bytes]] = {}
        for role, (n, _) in counts.items():
            seeds[role] = [bytes(SigningKey.generate()) for _ in range(n)]
            pubs[role] = [public_key_of(s) for s in seeds[role]]
            for i, s in enumerate(seeds[role], 1):
                write_key(self.secrets / f"{role}-1-{i}.key", role, s)
        root = build_root(cluster, 1, now + expires_s, pubs, {r: t for r, (_, t) in counts.items()})
        data = sign_root(root, seeds["root"])
        self.install_root(1, data)
        self.save_meta({"cluster": cluster, "last_serial": 0})
        return root

    def rotate(
        self,
        roles: list[str],
        counts: dict[str, tuple[int, int]],
        now: int,
        expires_s: int,
    ) -> tuple[Root, bytes, int, int]:
        """Build root N+1 with fresh keys for ``roles``; sign with every root key present here.
        Returns (root, signed bytes, valid old-root signatures, valid new-root signatures)."""
        cur = self.root()
        gen = cur.version + 1
        pubs: dict[str, list[bytes]] = {r: [cur.keys[k] for k in cur.roles[r].keyids] for r in ROLE_NAMES}
        thresholds = {r: cur.roles[r].threshold for r in ROLE_NAMES}
        for role in counts:
            if role not in roles:
                raise CliError(f"--{role}-keys/--{role}-threshold need --rotate {role}")
        new_seeds: dict[str, list[bytes]] = {}
        for role in roles:
            n, t = counts.get(role, (len(pubs[role]), thresholds[role]))
            new_seeds[role] = [bytes(SigningKey.generate()) for _ in range(n)]
            pubs[role] = [public_key_of(s) for s in new_seeds[role]]
            thresholds[role] = t
        new_root = build_root(cur.cluster, gen, now + expires_s, pubs, thresholds)
        signers = self.role_seeds(cur, "root") + new_seeds.get("root", [])
        env = sign("root", encode(new_root), list(dict.fromkeys(signers)))
        for role, ss in new_seeds.items():
            for i, s in enumerate(ss, 1):
                write_key(self.secrets / f"{role}-{gen}-{i}.key", role, s)
        old_ok = len(valid_signers(env, cur.keys, cur.role_keys("root")))
        new_ok = len(valid_signers(env, new_root.keys, new_root.role_keys("root")))
        return new_root, encode_envelope(env), old_ok, new_ok


def new_node_keys() -> tuple[bytes, bytes]:
    """(Ed25519 identity seed, X25519 static private key)."""
    return bytes(SigningKey.generate()), bytes(PrivateKey.generate())


def new_cert_id() -> str:
    return pysecrets.token_hex(8)
