"""Ed25519 keys, key ids and domain-separated envelopes.

An envelope carries the exact payload bytes plus ``[(key_id, sig)]``.  Each signature covers
``b"policymesh/v1/<type>\\0" + payload`` so a certificate can never be replayed as a policy.  Verify
over the exact bytes first, decode after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from protocol.errors import FormatError, SignatureError

ENVELOPE_TYPES = ("root", "policy", "cert", "member")
MAX_ENVELOPE_BYTES = 1 << 20  # 1 MiB: every signed object we know is far smaller
DOMAIN_PREFIX = b"policymesh/v1/"


class Signature(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    key_id: str
    sig: bytes


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: str
    payload: bytes
    signatures: tuple[Signature, ...] = ()


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_encoder = msgspec.msgpack.Encoder()


def key_id(public_key: bytes) -> str:
    """Stable id of an Ed25519 public key: hex of a domain-separated SHA-256, 32 hex chars."""
    return hashlib.sha256(b"policymesh/v1/keyid\0" + public_key).hexdigest()[:32]


def signing_message(env_type: str, payload: bytes) -> bytes:
    return DOMAIN_PREFIX + env_type.encode() + b"\0" + payload


def sign(env_type: str, payload: bytes, seeds: list[bytes]) -> Envelope:
    """Sign ``payload`` with each 32-byte Ed25519 seed."""
    if env_type not in ENVELOPE_TYPES:
        raise ValueError(f"unknown envelope type {env_type!r}")
    env = Envelope(type=env_type, payload=payload)
    for seed in seeds:
        env = add_signature(env, seed)
    return env


def add_signature(env: Envelope, seed: bytes) -> Envelope:
    """Return ``env`` with one more signature (idempotent for a key that already signed)."""
    sk = SigningKey(seed)
    kid = key_id(bytes(sk.verify_key))
    if any(s.key_id == kid for s in env.signatures):
        return env
    sig = sk.sign(signing_message(env.type, env.payload)).signature
    return Envelope(type=env.type, payload=env.payload, signatures=(*env.signatures, Signature(kid, sig)))


def encode_envelope(env: Envelope) -> bytes:
    return _encoder.encode(env)


def decode_envelope(data: bytes, expected_type: str, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Decode untrusted bytes into an Envelope of ``expected_type``; size cap before decoding."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError("envelope must be bytes")
    if len(data) > max_bytes:
        raise FormatError(f"{expected_type} envelope is {len(data)} bytes, over the {max_bytes}-byte cap")
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise FormatError(f"not a signed {expected_type} envelope: {exc}") from None
    if env.type != expected_type:
        raise FormatError(f"expected a signed {expected_type}, got a signed {env.type!r}")
    return env


def valid_signers(env: Envelope, keys: Mapping[str, bytes], allowed: set[str] | frozenset[str]) -> set[str]:
    """Key ids among ``allowed`` whose signature over the envelope verifies. Each key counts once;
    unknown key ids are ignored."""
    msg = signing_message(env.type, env.payload)
    good: set[str] = set()
    for s in env.signatures:
        if s.key_id in good or s.key_id not in allowed:
            continue
        pub = keys.get(s.key_id)
        if pub is None or len(s.sig) != 64:
            continue
        try:
            VerifyKey(pub).verify(msg, s.sig)
        except (BadSignatureError, ValueError, TypeError):
            continue
        good.add(s.key_id)
    return good


def require_threshold(
    env: Envelope,
    keys: Mapping[str, bytes],
    allowed: set[str] | frozenset[str],
    threshold: int,
    what: str,
) -> set[str]:
    good = valid_signers(env, keys, allowed)
    if len(good) < threshold:
        raise SignatureError(
            f"{what}: {len(good)} valid signature(s) from distinct authorised keys, threshold is {threshold}"
        )
    return good


def public_key_of(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)
