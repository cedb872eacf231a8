"""The authority directory on disk and the node directory `node enroll` writes.

    AUTH/authority.json        cluster name and the last signed serial (never reused)
    AUTH/root.msgpack          current root metadata: the public trust anchor nodes pin
    AUTH/roots/root.N.msgpack  every root version (nodes catch up through the chain)
    AUTH/secrets/ROLE-G-I.key  one private key per file (mode 0600): key I of ROLE in root generation G
    AUTH/secrets/HOLDER/ROLE-G-I.key   the same, with ``--holders``: key I of every role is HOLDER number I's

Key files are plaintext or passphrase-encrypted (see :mod:`meshnode.keyfile`). Nothing here signs with
a key it was not handed: signing takes the key files as arguments.
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from protocol.trust import (
    ROLE_NAMES,
    Root,
    build_root,
    decode_envelope,
    decode_root,
    encode,
    encode_envelope,
    public_key_of,
    sign,
    sign_root,
    valid_signers,
)
from protocol.trust.names import NAME_RULE, is_name

from .fsutil import atomic_write
from .keyfile import (
    CliError,
    KeyFile,
    UnreadableInput,
    UsageError,
    kdf_limits,
    key_header,
    read_key,
    write_key,
)

__all__ = ["CliError", "KeyFile", "UnreadableInput", "UsageError", "read_key", "write_key", "AuthorityDir", "parse_duration"]

ROOT_FILE = "root.msgpack"
KEY_RE = re.compile(r"\A(root|policy|enroll)-([0-9]+)-([0-9]+)\.key\Z", re.ASCII)
ROOT_NAME_RE = re.compile(r"\Aroot\.([0-9]{1,20})\.msgpack\Z", re.ASCII)
_DUR_RE = re.compile(r"\A([0-9]{1,12})([smhdw])\Z", re.ASCII)
NewPassphrases = dict[str | None, bytes]
"""Passphrases for new key files: by holder name, or None for every holder (or the default layout)."""
_DUR_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    m = _DUR_RE.fullmatch(text.strip())
    if not m:
        raise CliError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    value = int(m.group(1)) * _DUR_UNITS[m.group(2)]
    if value <= 0:
        raise CliError(f"duration {text!r} must be positive")
    return value


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

    def key_paths(self) -> list[Path]:
        """Every key file in the authority's ``secrets/`` (the default layout and per-holder directories)."""
        if not self.secrets.is_dir():
            return []
        return sorted(p for p in (*self.secrets.glob("*.key"), *self.secrets.glob("*/*.key")) if KEY_RE.fullmatch(p.name))

    def key_ids_here(self) -> set[str]:
        """Key ids of the private keys present here (read without decrypting anything)."""
        return {str(key_header(p).get("key_id")) for p in self.key_paths()}

    def role_seeds(self, root: Root, role: str) -> list[bytes]:
        """Seeds of the plaintext keys present here that the root lists for ``role`` (an encrypted one is an
        error: it is opened only when named)."""
        wanted = set(root.roles[role].keyids)
        mine = [(p, h) for p in self.key_paths() if (h := key_header(p))["role"] == role and h.get("key_id") in wanted]
        for p, h in mine:
            if h["encrypted"]:
                raise UsageError(f"{p} is encrypted: name it with --key {p} --passphrase-file FILE")
        return [read_key(p).seed for p, _ in mine]

    def holders(self) -> list[str]:
        return list(self.meta().get("holders", []))

    def key_path(self, role: str, generation: int, index: int, holders: list[str]) -> Path:
        """Where key ``index`` (1-based) of ``role`` in root generation ``generation`` is written."""
        name = f"{role}-{generation}-{index}.key"
        return self.secrets / holders[index - 1] / name if holders else self.secrets / name

    def _write_new_keys(self, generation: int, seeds: dict[str, list[bytes]], holders: list[str],
                        passphrases: NewPassphrases) -> None:
        for role, ss in seeds.items():
            if holders and len(ss) > len(holders):
                raise CliError(f"{len(ss)} {role} keys but {len(holders)} holders: a holder would hold two keys of "
                               "one role, which defeats the threshold")
        limits = kdf_limits()
        for role, ss in seeds.items():
            for i, s in enumerate(ss, 1):
                holder = holders[i - 1] if holders else None
                phrase = passphrases.get(holder, passphrases.get(None))
                write_key(self.key_path(role, generation, i, holders), role, s, phrase, limits)

    def install_root(self, version: int, data: bytes) -> None:
        atomic_write(self.roots / f"root.{version}.msgpack", data)
        atomic_write(self.path / ROOT_FILE, data)

    def init(
        self,
        cluster: str,
        counts: dict[str, tuple[int, int]],
        now: int,
        expires_s: int,
        holders: list[str] | None = None,
        passphrases: NewPassphrases | None = None,
    ) -> Root:
        """Make the keys (key I of every role to holder I when ``holders`` are given; each encrypted with
        ``passphrases[holder]``, else ``passphrases[None]``, else plaintext) and root v1."""
        holders = list(holders or [])
        for h in holders:
            if not is_name(h):
                raise CliError(f"--holders {h!r}: {NAME_RULE}")
        if len(set(holders)) != len(holders):
            raise CliError("--holders: each holder once")
        passphrases = passphrases or {}
        for holder in passphrases:
            if holder is not None and holder not in holders:
                raise CliError(f"--passphrase-file {holder}=...: {holder!r} is not one of --holders")
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
        self._write_new_keys(1, seeds, holders, passphrases)
        root = build_root(cluster, 1, now + expires_s, pubs, {r: t for r, (_, t) in counts.items()})
        data = sign_root(root, seeds["root"])
        self.install_root(1, data)
        self.save_meta({"cluster": cluster, "last_serial": 0, **({"holders": holders} if holders else {})})
        return root

    def rotate(
        self,
        roles: list[str],
        counts: dict[str, tuple[int, int]],
        now: int,
        expires_s: int,
        signers: list[KeyFile],
        passphrases: NewPassphrases | None = None,
    ) -> tuple[Root, bytes, int, int]:
        """Build root N+1 with fresh keys for ``roles`` (written like :meth:`init` writes them); sign it with
        the current root keys ``signers`` and the new root keys, if any.
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
        for k in signers:
            if k.role != "root" or k.key_id not in cur.roles["root"].keyids:
                raise CliError(f"{k.path}: not a root key of root v{cur.version}")
        seeds = [k.seed for k in signers] + new_seeds.get("root", [])
        env = sign("root", encode(new_root), list(dict.fromkeys(seeds)))
        self._write_new_keys(gen, new_seeds, self.holders(), passphrases or {})
        old_ok = len(valid_signers(env, cur.keys, cur.role_keys("root")))
        new_ok = len(valid_signers(env, new_root.keys, new_root.role_keys("root")))
        return new_root, encode_envelope(env), old_ok, new_ok


def new_node_keys() -> tuple[bytes, bytes]:
    """(Ed25519 identity seed, X25519 static private key)."""
    return bytes(SigningKey.generate()), bytes(PrivateKey.generate())


def new_cert_id() -> str:
    return pysecrets.token_hex(8)
