"""The symmetric half of Noise revision 34: hash functions, HKDF, X25519 DH, CipherState, SymmetricState.

ChaChaPoly (IETF) for the cipher, BLAKE2b or SHA256 for the hash, X25519 for DH, all on PyNaCl/hashlib;
the names follow the specification (sections 4 and 5.1-5.2) so the code reads side by side with it.
`protocol.channel.noise` builds the handshakes on these; after a handshake the two `CipherState`s from
`SymmetricState.split()` carry the transport. A `CipherState` whose decrypt fails keeps its nonce, so
the caller decides what to do (the channel kills the session).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from nacl import bindings
from nacl.exceptions import CryptoError

from protocol.channel.noise_errors import (
    DecryptError,
    LowOrderPointError,
    MalformedMessageError,
    MessageTooLongError,
    NonceExhaustedError,
)
from protocol.errors import LocalProtocolError

__all__ = [
    "BLAKE2B",
    "DHLEN",
    "KEY_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "SHA256",
    "TAG_LEN",
    "CipherState",
    "HashFunction",
    "SymmetricState",
    "dh",
    "hkdf",
    "x25519_public_key",
]

MAX_MESSAGE_LEN: Final = 65535
"""Every Noise message, handshake or transport, is at most this many bytes (spec section 3)."""
TAG_LEN: Final = 16
DHLEN: Final = 32
KEY_LEN: Final = 32
MAX_NONCE: Final = 2**64 - 1
"""Reserved: a CipherState refuses to encrypt or decrypt with it (spec section 5.1); Rekey uses it."""

_ZERO_KEY: Final = bytes(KEY_LEN)
_NONCE_PREFIX: Final = bytes(4)
_REKEY_NONCE: Final = _NONCE_PREFIX + MAX_NONCE.to_bytes(8, "little")


# --------------------------------------------------------------------------------------------- primitives


@dataclass(frozen=True, slots=True)
class HashFunction:
    """A Noise HASH function: its name in protocol names, HASHLEN, BLOCKLEN and a hashlib-style
    constructor, used for HASH() and for HMAC-HASH (RFC 2104, as the spec requires)."""

    name: str
    hashlen: int
    blocklen: int
    constructor: Callable[..., Any]

    def digest(self, data: bytes) -> bytes:
        result: bytes = self.constructor(data).digest()
        return result

    def hmac(self, key: bytes, data: bytes) -> bytes:
        """HMAC-HASH(key, data). Inlined RFC 2104 (the stdlib's generic path costs twice as much for
        BLAKE2b, which OpenSSL's one-shot HMAC does not cover)."""
        if len(key) > self.blocklen:
            key = self.digest(key)
        key = key.ljust(self.blocklen, b"\x00")
        inner = self.constructor(key.translate(_IPAD) + data).digest()
        outer: bytes = self.constructor(key.translate(_OPAD) + inner).digest()
        return outer


_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))

BLAKE2B: Final = HashFunction("BLAKE2b", 64, 128, hashlib.blake2b)
SHA256: Final = HashFunction("SHA256", 32, 64, hashlib.sha256)


def hkdf(hash_fn: HashFunction, chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF as defined in spec section 4.3: HMAC-HASH with the chaining key, 2 or 3 outputs."""
    if num_outputs not in (2, 3):
        raise LocalProtocolError("HKDF produces 2 or 3 outputs")
    mac = hash_fn.hmac
    temp_key = mac(chaining_key, ikm)
    output1 = mac(temp_key, b"\x01")
    output2 = mac(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    return output1, output2, mac(temp_key, output2 + b"\x03")


def x25519_public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamping is done by libsodium)."""
    if len(private) != DHLEN:
        raise LocalProtocolError(f"X25519 private key must be {DHLEN} bytes, got {len(private)}")
    return bindings.crypto_scalarmult_base(bytes(private))


def dh(private: bytes, public: bytes) -> bytes:
    """DH() of spec section 4.1: X25519, refusing a low-order point's all-zero shared secret."""
    try:
        shared = bindings.crypto_scalarmult(private, public)
    except CryptoError as exc:  # libsodium refuses an all-zero result
        raise LowOrderPointError("X25519 with a low-order point") from exc
    if hmac.compare_digest(shared, _ZERO_KEY):  # defence in depth, whatever the libsodium version
        raise LowOrderPointError("X25519 with a low-order point")
    return shared


# --------------------------------------------------------------------------------------------- CipherState


class CipherState:
    """k and n of spec section 5.1 with ChaChaPoly (IETF, 96-bit nonce: 32 zero bits then n in little
    endian). `encrypt`/`decrypt` are EncryptWithAd/DecryptWithAd; without a key they pass through."""

    __slots__ = ("_k", "_n")

    def __init__(self, key: bytes | None = None) -> None:
        self._k: bytes | None = None
        self._n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        if key is not None and len(key) != KEY_LEN:
            raise LocalProtocolError(f"cipher key must be {KEY_LEN} bytes")
        self._k = key
        self._n = 0

    def has_key(self) -> bool:
        return self._k is not None

    @property
    def nonce(self) -> int:
        return self._n

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("nonce out of range")
        self._n = nonce

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        key = self._k
        if key is None:
            return plaintext
        if len(plaintext) > MAX_MESSAGE_LEN - TAG_LEN:
            raise MessageTooLongError(
                f"plaintext of {len(plaintext)} bytes exceeds {MAX_MESSAGE_LEN - TAG_LEN}"
            )
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("nonce space exhausted")
        ciphertext = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, ad, _NONCE_PREFIX + n.to_bytes(8, "little"), key
        )
        self._n = n + 1
        return ciphertext

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        key = self._k
        if key is None:
            return ciphertext
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise MalformedMessageError(f"ciphertext of {len(ciphertext)} bytes exceeds {MAX_MESSAGE_LEN}")
        if len(ciphertext) < TAG_LEN:
            raise DecryptError("ciphertext shorter than the authentication tag")
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("nonce space exhausted")
        try:
            plaintext = bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, ad, _NONCE_PREFIX + n.to_bytes(8, "little"), key
            )
        except CryptoError as exc:
            raise DecryptError("authentication failed") from exc  # the nonce is left where it was
        self._n = n + 1
        return plaintext

    def rekey(self) -> None:
        """Rekey(): k = ENCRYPT(k, 2^64-1, zerolen, zeros)[:32]; the nonce is unchanged (spec 4.2)."""
        key = self._k
        if key is None:
            raise LocalProtocolError("cannot rekey a CipherState without a key")
        self._k = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(_ZERO_KEY, b"", _REKEY_NONCE, key)[
            :KEY_LEN
        ]


# --------------------------------------------------------------------------------------------- SymmetricState


class SymmetricState:
    """ck, h and a CipherState (spec section 5.2)."""

    __slots__ = ("_hash", "ck", "h", "cipher")

    def __init__(self, protocol_name: bytes, hash_fn: HashFunction) -> None:
        self._hash = hash_fn
        if len(protocol_name) <= hash_fn.hashlen:
            self.h = protocol_name.ljust(hash_fn.hashlen, b"\x00")
        else:
            self.h = hash_fn.digest(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self._hash, self.ck, ikm, 2)
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash.digest(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self._hash, self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self._hash, self.ck, b"", 2)
        return CipherState(temp_k1[:KEY_LEN]), CipherState(temp_k2[:KEY_LEN])
