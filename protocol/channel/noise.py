"""The Noise Protocol Framework, revision 34, on PyNaCl: the handshakes under every mesh channel.

`Noise_XX_25519_ChaChaPoly_BLAKE2b` is what the mesh uses (`NoiseXX`). The state objects follow the
specification's names one for one (CipherState, SymmetricState, HandshakeState) so the code can be read
side by side with it and checked against other implementations' test vectors; the handshake itself is a
small interpreter over pattern tables, so NN and IK come for free and SHA256 is a parameter.

This module owns the named handshakes (`NoiseXX`, `NoiseIK`, `NoiseNN`): façades that fix a pattern
over the spec's HandshakeState interpreter in `protocol.channel.noise_handshake`; the pattern tables
are in `protocol.channel.noise_patterns`, the primitives, CipherState and SymmetricState in
`protocol.channel.noise_cipher`, the errors in `protocol.channel.noise_errors`. Every name of those
listed in `__all__` is re-exported here, so `protocol.channel.noise` stays the one import.

Nothing here reads a clock or an entropy source: the ephemeral key comes in as `ephemeral_private`
(test vectors) or from an `entropy(n) -> bytes` callable the shell passes in (the daemon passes
`os.urandom`). An ephemeral private key must never be used for two handshakes.

Blame follows h11: errors caused by the bytes a peer sent are `RemoteProtocolError`s, misuse of this
API is a `LocalProtocolError`. A handshake that fails while processing a message is dead, as the
specification requires; a transport `CipherState` whose decrypt fails keeps its nonce, so the caller
decides (the channel kills the session).
"""

from __future__ import annotations

from protocol.channel.noise_cipher import (
    BLAKE2B,
    DHLEN,
    KEY_LEN,
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    SHA256,
    TAG_LEN,
    CipherState,
    HashFunction,
    SymmetricState,
    hkdf,
    x25519_public_key,
)
from protocol.channel.noise_errors import (
    DecryptError,
    HandshakeFailedError,
    LowOrderPointError,
    MalformedMessageError,
    MessageTooLongError,
    NoiseError,
    NonceExhaustedError,
    OutOfTurnError,
)
from protocol.channel.noise_handshake import EXPORTER_INPUT, Entropy, HandshakeState
from protocol.channel.noise_patterns import IK, NN, XX, HandshakePattern

__all__ = [
    "BLAKE2B",
    "DHLEN",
    "IK",
    "KEY_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "NN",
    "SHA256",
    "TAG_LEN",
    "XX",
    "EXPORTER_INPUT",
    "CipherState",
    "DecryptError",
    "Entropy",
    "HandshakeFailedError",
    "HandshakePattern",
    "HandshakeState",
    "HashFunction",
    "LowOrderPointError",
    "MalformedMessageError",
    "MessageTooLongError",
    "NoiseError",
    "NoiseIK",
    "NoiseNN",
    "NoiseXX",
    "NonceExhaustedError",
    "OutOfTurnError",
    "SymmetricState",
    "hkdf",
    "x25519_public_key",
]


# --------------------------------------------------------------------------------------------- façades


class NoiseXX(HandshakeState):
    """Noise_XX_25519_ChaChaPoly_BLAKE2b: mutual authentication, identities hidden from passive
    observers, forward secrecy. The mesh channel's handshake."""

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
        *,
        entropy: Entropy | None = None,
        hash_fn: HashFunction = BLAKE2B,
        static_public: bytes | None = None,
    ) -> None:
        super().__init__(
            XX,
            initiator,
            static_private=static_private,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
            entropy=entropy,
            hash_fn=hash_fn,
            static_public=static_public,
        )


class NoiseIK(HandshakeState):
    """Noise_IK: the initiator knows the responder's static key in advance."""

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
        *,
        remote_static: bytes | None = None,
        entropy: Entropy | None = None,
        hash_fn: HashFunction = BLAKE2B,
    ) -> None:
        super().__init__(
            IK,
            initiator,
            static_private=static_private,
            remote_static=remote_static,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
            entropy=entropy,
            hash_fn=hash_fn,
        )


class NoiseNN(HandshakeState):
    """Noise_NN: unauthenticated, ephemeral only. For tests and vectors, never for the mesh."""

    def __init__(
        self,
        initiator: bool,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
        *,
        entropy: Entropy | None = None,
        hash_fn: HashFunction = BLAKE2B,
    ) -> None:
        super().__init__(
            NN,
            initiator,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
            entropy=entropy,
            hash_fn=hash_fn,
        )
