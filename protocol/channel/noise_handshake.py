"""The spec's HandshakeState (Noise revision 34, section 5.3): the handshake as an interpreter over a pattern.

One object per handshake and side: it mixes the prologue and the pre-message keys into a
`SymmetricState`, then alternates `write_message` / `read_message` through the pattern's token lists
(e, s, ee, es, se, ss) and, after the last message, splits into the two transport `CipherState`s and
derives an exporter secret. The named handshakes the mesh and the vectors use (`NoiseXX`, `NoiseIK`,
`NoiseNN`) are thin façades over this class in `protocol.channel.noise`, the one import for callers.

No clock, no hidden entropy: the ephemeral key is `ephemeral_private` (test vectors) or comes from the
`entropy(n)` callable the shell passes in. A handshake that fails while processing a message is dead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from protocol.channel.noise_cipher import (
    BLAKE2B,
    DHLEN,
    MAX_MESSAGE_LEN,
    TAG_LEN,
    CipherState,
    HashFunction,
    SymmetricState,
    dh,
    hkdf,
    x25519_public_key,
)
from protocol.channel.noise_errors import (
    HandshakeFailedError,
    MalformedMessageError,
    MessageTooLongError,
    OutOfTurnError,
)
from protocol.channel.noise_patterns import EE, ES, SS, E, HandshakePattern, S, needs_local_static
from protocol.errors import LocalProtocolError

__all__ = ["EXPORTER_INPUT", "Entropy", "HandshakeState"]

Entropy = Callable[[int], bytes]
"""`entropy(n)` returns n uniformly random bytes (the daemon passes os.urandom)."""

EXPORTER_INPUT: Final = b"policymesh exporter v1"
"""HKDF input for `HandshakeState.exporter_secret` (split() uses the empty input)."""


# --------------------------------------------------------------------------------------------- HandshakeState


class HandshakeState:
    """The spec's HandshakeState (section 5.3) for any pattern built from e, s, ee, es, se, ss.

    `write_message(payload)` / `read_message(message)` alternate, initiator first; after the last
    message `complete` is true and `split()` returns this side's `(send, recv)` cipher states.
    """

    def __init__(
        self,
        pattern: HandshakePattern,
        initiator: bool,
        *,
        static_private: bytes | None = None,
        remote_static: bytes | None = None,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
        entropy: Entropy | None = None,
        hash_fn: HashFunction = BLAKE2B,
        static_public: bytes | None = None,
    ) -> None:
        if ephemeral_private is None and entropy is None:
            raise LocalProtocolError("an ephemeral key needs ephemeral_private or an entropy source")
        if ephemeral_private is not None and len(ephemeral_private) != DHLEN:
            raise LocalProtocolError(f"ephemeral_private must be {DHLEN} bytes")
        if static_private is None and needs_local_static(pattern, initiator):
            raise LocalProtocolError(f"pattern {pattern.name} needs a local static key")
        remote_pre = pattern.responder_pre if initiator else pattern.initiator_pre
        if S in remote_pre and remote_static is None:
            raise LocalProtocolError(f"pattern {pattern.name} needs the remote static key in advance")
        if remote_static is not None and len(remote_static) != DHLEN:
            raise LocalProtocolError(f"remote_static must be {DHLEN} bytes")

        self.pattern = pattern
        self.initiator = initiator
        self.protocol_name = f"Noise_{pattern.name}_25519_ChaChaPoly_{hash_fn.name}"
        self._hash_fn = hash_fn
        self._entropy = entropy
        self._s: bytes | None = None
        self._s_pub: bytes | None = None
        if static_private is not None:
            self._s = bytes(static_private)
            # static_public: a caller that derived it once (SecureSession's LocalIdentity) saves a scalar
            # multiplication per handshake; a wrong one only makes the peer's DH results disagree.
            self._s_pub = x25519_public_key(self._s) if static_public is None else bytes(static_public)
        self._e: bytes | None = None
        self._e_given = None if ephemeral_private is None else bytes(ephemeral_private)
        self._rs = None if remote_static is None else bytes(remote_static)
        self._re: bytes | None = None
        self._index = 0
        self._failed = False
        self._split: tuple[CipherState, CipherState] | None = None
        self._handshake_hash: bytes | None = None
        self._exporter: bytes | None = None

        ss = SymmetricState(self.protocol_name.encode("ascii"), hash_fn)
        ss.mix_hash(prologue)
        for who_pre, is_local in ((pattern.initiator_pre, initiator), (pattern.responder_pre, not initiator)):
            for token in who_pre:
                if token != S:
                    raise LocalProtocolError("only static keys are supported in pre-messages")
                key = self._s_pub if is_local else self._rs
                assert key is not None  # checked above
                ss.mix_hash(key)
        self._ss: SymmetricState | None = ss

    # ------------------------------------------------------------------ state

    @property
    def complete(self) -> bool:
        return self._split is not None

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static X25519 public key, once received (or as given for IK's initiator)."""
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        return self._re

    @property
    def local_static_public(self) -> bytes | None:
        return self._s_pub

    @property
    def handshake_hash(self) -> bytes:
        """h: the channel binding. Final once `complete`; before that the running value."""
        if self._handshake_hash is not None:
            return self._handshake_hash
        if self._ss is None:
            raise HandshakeFailedError("the handshake failed")
        return self._ss.h

    @property
    def exporter_secret(self) -> bytes:
        """A secret both sides share once ``complete`` (HASHLEN bytes), derived from the final chaining
        key apart from the transport keys: the root of any further key (labelled by its user)."""
        if self._exporter is None:
            raise OutOfTurnError("exporter_secret before the handshake completed")
        return self._exporter

    @property
    def my_turn(self) -> bool:
        return not self.complete and not self._failed and (self._index % 2 == 0) == self.initiator

    def split(self) -> tuple[CipherState, CipherState]:
        """This side's transport cipher states as (send, recv)."""
        if self._split is None:
            raise OutOfTurnError("split() before the handshake completed")
        return self._split

    # ------------------------------------------------------------------ messages

    def _check_turn(self, writing: bool) -> SymmetricState:
        if self._failed:
            raise HandshakeFailedError("the handshake failed and must be discarded")
        if self._split is not None or self._ss is None:
            raise OutOfTurnError("the handshake is already complete")
        if ((self._index % 2 == 0) == self.initiator) != writing:
            raise OutOfTurnError(f"not this side's turn to {'write' if writing else 'read'}")
        return self._ss

    def _dh_keys(self, token: str) -> tuple[bytes | None, bytes | None]:
        """(local private, remote public) for a DH token; token names list the initiator's key first."""
        if token == EE:
            return self._e, self._re
        if token == SS:
            return self._s, self._rs
        if token == ES:
            return (self._e, self._rs) if self.initiator else (self._s, self._re)
        return (self._s, self._re) if self.initiator else (self._e, self._rs)  # SE

    def _mix_dh(self, ss: SymmetricState, token: str) -> None:
        private, public = self._dh_keys(token)
        if private is None or public is None:
            raise LocalProtocolError(f"token {token}: key not available")
        ss.mix_key(dh(private, public))

    def _outgoing_length(self, ss: SymmetricState, tokens: tuple[str, ...], payload_len: int) -> int:
        keyed = ss.cipher.has_key()
        length = 0
        for token in tokens:
            if token == E:
                length += DHLEN
            elif token == S:
                length += DHLEN + (TAG_LEN if keyed else 0)
            else:
                keyed = True
        return length + payload_len + (TAG_LEN if keyed else 0)

    def write_message(self, payload: bytes = b"") -> bytes:
        ss = self._check_turn(writing=True)
        tokens = self.pattern.messages[self._index]
        length = self._outgoing_length(ss, tokens, len(payload))
        if length > MAX_MESSAGE_LEN:
            raise MessageTooLongError(f"handshake message of {length} bytes exceeds {MAX_MESSAGE_LEN}")
        try:
            parts: list[bytes] = []
            for token in tokens:
                if token == E:
                    self._e = self._new_ephemeral()
                    e_pub = x25519_public_key(self._e)
                    parts.append(e_pub)
                    ss.mix_hash(e_pub)
                elif token == S:
                    assert self._s_pub is not None  # checked at construction
                    parts.append(ss.encrypt_and_hash(self._s_pub))
                else:
                    self._mix_dh(ss, token)
            parts.append(ss.encrypt_and_hash(bytes(payload)))
        except BaseException:
            self._fail()
            raise
        self._advance(ss)
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        ss = self._check_turn(writing=False)
        message = bytes(message)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise MalformedMessageError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}")
            offset = 0
            for token in self.pattern.messages[self._index]:
                if token == E:
                    if len(message) - offset < DHLEN:
                        raise MalformedMessageError("message too short for an ephemeral key")
                    self._re = message[offset : offset + DHLEN]
                    offset += DHLEN
                    ss.mix_hash(self._re)
                elif token == S:
                    size = DHLEN + (TAG_LEN if ss.cipher.has_key() else 0)
                    if len(message) - offset < size:
                        raise MalformedMessageError("message too short for a static key")
                    self._rs = ss.decrypt_and_hash(message[offset : offset + size])
                    offset += size
                else:
                    self._mix_dh(ss, token)
            if ss.cipher.has_key() and len(message) - offset < TAG_LEN:
                raise MalformedMessageError("message too short for the payload tag")
            payload = ss.decrypt_and_hash(message[offset:])
        except BaseException:
            self._fail()
            raise
        self._advance(ss)
        return payload

    # ------------------------------------------------------------------ internals

    def _new_ephemeral(self) -> bytes:
        if self._e_given is not None:
            key, self._e_given = self._e_given, None
            return key
        if self._entropy is None:
            raise LocalProtocolError("ephemeral_private was already used and no entropy source was given")
        key = self._entropy(DHLEN)
        if not isinstance(key, bytes) or len(key) != DHLEN:
            raise LocalProtocolError(f"entropy source must return {DHLEN} bytes")
        return key

    def _advance(self, ss: SymmetricState) -> None:
        self._index += 1
        if self._index == len(self.pattern.messages):
            first, second = ss.split()
            self._split = (first, second) if self.initiator else (second, first)
            self._handshake_hash = ss.h
            # An exporter secret for keys beyond the stream's two (e.g. the datagram keys of
            # protocol.channel.datagram): HKDF of the secret chaining key with its own input, so it is
            # independent of split()'s keys, and ck itself never leaves this object.
            self._exporter = hkdf(self._hash_fn, ss.ck, EXPORTER_INPUT, 2)[0]
            self._ss = None  # drop ck and the handshake keys
            self._e = None

    def _fail(self) -> None:
        self._failed = True
        self._ss = None
        self._e = None
