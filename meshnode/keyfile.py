"""Private key files: one Ed25519 seed per file (mode 0600), in plaintext or encrypted at rest.

Format 1 (plaintext)::

    {"role": "policy", "key_id": "...", "ed25519_seed": "<hex>"}

Format 2 (encrypted with a passphrase: Argon2id from libsodium derives a SecretBox key)::

    {"format": 2, "role": "policy", "key_id": "...",
     "kdf": {"name": "argon2id", "opslimit": 2, "memlimit": 67108864, "salt": "<hex>"},
     "cipher": "xsalsa20poly1305", "sealed_seed": "<hex: nonce + ciphertext>"}

The role and key id stay readable (``authority show`` and signing check them before asking for a
passphrase); the KDF parameters travel in the file, so a file written with sensitive limits opens
anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.utils
from nacl.secret import SecretBox

from protocol.errors import MeshError
from protocol.trust import ROLE_NAMES, key_id, public_key_of

from .fsutil import write_secret

KDF_LIMITS = {
    "interactive": (argon2id.OPSLIMIT_INTERACTIVE, argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE),
    "sensitive": (argon2id.OPSLIMIT_SENSITIVE, argon2id.MEMLIMIT_SENSITIVE),
}
KDF_ENV = "POLICYMESH_KDF_LIMITS"
"""Environment variable naming the Argon2id limits for new encrypted keys (default ``interactive``)."""
_MAX_OPSLIMIT = argon2id.OPSLIMIT_SENSITIVE
_MAX_MEMLIMIT = argon2id.MEMLIMIT_SENSITIVE

Passphrase = Callable[[Path], bytes]
"""Returns the passphrase for the encrypted key file at the given path."""


class CliError(MeshError):
    """An operator-facing error: printed as one line, non-zero exit."""


class UsageError(CliError):
    """The command line is incomplete in a way argparse cannot tell (exit 2, like a parser error)."""


class UnreadableInput(CliError):
    """A file the command needs is missing or cannot be read (exit 3, not "invalid")."""


@dataclass(frozen=True)
class KeyFile:
    role: str
    key_id: str
    seed: bytes
    path: Path


def kdf_limits(name: str | None = None) -> tuple[int, int]:
    name = name or os.environ.get(KDF_ENV) or "interactive"
    if name not in KDF_LIMITS:
        raise CliError(f"key derivation limits {name!r}: one of {', '.join(KDF_LIMITS)}")
    return KDF_LIMITS[name]


def write_key(path: Path, role: str, seed: bytes, passphrase: bytes | None = None,
              limits: tuple[int, int] | None = None) -> KeyFile:
    """Write one private key (mode 0600, parent directories 0700); encrypted when ``passphrase`` is given."""
    kid = key_id(public_key_of(seed))
    body: dict = {"role": role, "key_id": kid}
    if passphrase is None:
        body["ed25519_seed"] = seed.hex()
    else:
        opslimit, memlimit = limits or kdf_limits()
        salt = nacl.utils.random(argon2id.SALTBYTES)
        box = SecretBox(argon2id.kdf(SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit))
        body = {"format": 2, **body,
                "kdf": {"name": "argon2id", "opslimit": opslimit, "memlimit": memlimit, "salt": salt.hex()},
                "cipher": "xsalsa20poly1305", "sealed_seed": bytes(box.encrypt(seed)).hex()}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_secret(path, json.dumps(body, indent=1).encode() + b"\n")
    return KeyFile(role, kid, seed, path)


def key_header(path: Path) -> dict:
    """The parsed key file without decrypting it: role, key_id, and whether it is ``encrypted``."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UnreadableInput(f"{path}: cannot read key: {exc.strerror or exc}") from None
    except ValueError:
        raise CliError(f"{path}: not a policymesh key file") from None
    if not isinstance(raw, dict) or raw.get("role") not in (*ROLE_NAMES, "identity"):
        raise CliError(f"{path}: not a policymesh key file")
    if raw.get("format", 1) not in (1, 2):
        raise CliError(f"{path}: key file format {raw.get('format')!r} is newer than this meshctl")
    raw["encrypted"] = raw.get("format", 1) == 2
    return raw


def read_key(path: Path, passphrase: Passphrase | None = None) -> KeyFile:
    """Read a key file; an encrypted one asks ``passphrase`` for its passphrase (an error without one)."""
    raw = key_header(path)
    try:
        if raw["encrypted"]:
            if passphrase is None:
                raise CliError(f"{path}: the key is encrypted; pass --passphrase-file FILE (or run on a terminal)")
            seed = _open_sealed(path, raw, passphrase(Path(path)))
        else:
            seed = bytes.fromhex(raw["ed25519_seed"])
    except (ValueError, KeyError, TypeError):
        raise CliError(f"{path}: not a policymesh key file") from None
    if len(seed) != 32:
        raise CliError(f"{path}: not a policymesh key file")
    kid = key_id(public_key_of(seed))
    if raw.get("key_id") not in (None, kid):
        raise CliError(f"{path}: key id does not match the key")
    return KeyFile(raw["role"], kid, seed, Path(path))


def _open_sealed(path: Path, raw: dict, passphrase: bytes) -> bytes:
    kdf = raw["kdf"]
    opslimit, memlimit, salt = int(kdf["opslimit"]), int(kdf["memlimit"]), bytes.fromhex(kdf["salt"])
    if kdf["name"] != "argon2id" or raw["cipher"] != "xsalsa20poly1305" or len(salt) != argon2id.SALTBYTES:
        raise CliError(f"{path}: unsupported key encryption")
    if not (argon2id.OPSLIMIT_MIN <= opslimit <= _MAX_OPSLIMIT and argon2id.MEMLIMIT_MIN <= memlimit <= _MAX_MEMLIMIT):
        raise CliError(f"{path}: key derivation limits out of range")
    box = SecretBox(argon2id.kdf(SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit))
    try:
        return box.decrypt(bytes.fromhex(raw["sealed_seed"]))
    except nacl.exceptions.CryptoError:
        raise CliError(f"{path}: wrong passphrase (or the key file is damaged)") from None
