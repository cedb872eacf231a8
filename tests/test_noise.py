"""Noise (revision 34) against the cacophony vectors, and the error contract of protocol/channel/noise.py."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from protocol.channel.noise import (
    BLAKE2B,
    IK,
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    NN,
    SHA256,
    TAG_LEN,
    XX,
    CipherState,
    DecryptError,
    HandshakeFailedError,
    HandshakeState,
    HashFunction,
    LowOrderPointError,
    MalformedMessageError,
    MessageTooLongError,
    NoiseError,
    NoiseIK,
    NoiseNN,
    NoiseXX,
    NonceExhaustedError,
    OutOfTurnError,
    hkdf,
    x25519_public_key,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"  # vendored: see vectors/README.md
PATTERNS = {"XX": XX, "IK": IK, "NN": NN}
HASHES = {"BLAKE2b": BLAKE2B, "SHA256": SHA256}


def _load_vectors() -> list[dict[str, Any]]:
    with (VECTORS_DIR / "noise-cacophony.json").open() as f:
        vectors: list[dict[str, Any]] = json.load(f)["vectors"]
    return vectors


def _supported(vector: dict[str, Any]) -> bool:
    noise, pattern, dh, cipher, hash_name = vector["protocol_name"].split("_")
    return (
        (noise, dh, cipher) == ("Noise", "25519", "ChaChaPoly")
        and pattern in PATTERNS
        and hash_name in HASHES
    )


VECTORS = _load_vectors()
SUPPORTED = [v for v in VECTORS if _supported(v)]


def _hex(vector: dict[str, Any], key: str) -> bytes | None:
    return bytes.fromhex(vector[key]) if key in vector else None


def test_vector_file_holds_what_we_claim() -> None:
    names = {v["protocol_name"] for v in SUPPORTED}
    assert "Noise_XX_25519_ChaChaPoly_BLAKE2b" in names
    assert "Noise_XX_25519_ChaChaPoly_SHA256" in names
    assert len(SUPPORTED) == len(VECTORS)  # every entry in the file is one we implement


@pytest.mark.parametrize("vector", SUPPORTED, ids=[v["protocol_name"] for v in SUPPORTED])
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    _, pattern_name, _, _, hash_name = vector["protocol_name"].split("_")
    hash_fn = HASHES[hash_name]
    initiator = HandshakeState(
        PATTERNS[pattern_name],
        True,
        static_private=_hex(vector, "init_static"),
        remote_static=_hex(vector, "init_remote_static"),
        prologue=_hex(vector, "init_prologue") or b"",
        ephemeral_private=_hex(vector, "init_ephemeral"),
        hash_fn=hash_fn,
    )
    responder = HandshakeState(
        PATTERNS[pattern_name],
        False,
        static_private=_hex(vector, "resp_static"),
        prologue=_hex(vector, "resp_prologue") or b"",
        ephemeral_private=_hex(vector, "resp_ephemeral"),
        hash_fn=hash_fn,
    )
    assert initiator.protocol_name == vector["protocol_name"]
    _run_vector_messages(initiator, responder, vector)
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]


def _run_vector_messages(
    initiator: HandshakeState, responder: HandshakeState, vector: dict[str, Any]
) -> None:
    """Messages alternate initiator, responder, ... through the handshake and on into transport."""
    sender, receiver = initiator, responder
    transport_messages = 0
    for message in vector["messages"]:
        payload, expected = bytes.fromhex(message["payload"]), bytes.fromhex(message["ciphertext"])
        if not sender.complete:
            wire = sender.write_message(payload)
            assert wire == expected
            assert receiver.read_message(wire) == payload
        else:
            transport_messages += 1
            wire = sender.split()[0].encrypt(b"", payload)
            assert wire == expected
            assert receiver.split()[1].decrypt(b"", wire) == payload
        sender, receiver = receiver, sender
    assert initiator.complete and responder.complete
    assert transport_messages >= 2  # both directions of the split were checked


@pytest.mark.parametrize("hash_name", ["BLAKE2b", "SHA256"])
def test_xx_vector_through_named_facade(hash_name: str) -> None:
    vector = next(v for v in VECTORS if v["protocol_name"] == f"Noise_XX_25519_ChaChaPoly_{hash_name}")
    prologue = _hex(vector, "init_prologue") or b""
    init_static, resp_static = _hex(vector, "init_static"), _hex(vector, "resp_static")
    assert init_static is not None and resp_static is not None
    initiator = NoiseXX(
        True, init_static, prologue, _hex(vector, "init_ephemeral"), hash_fn=HASHES[hash_name]
    )
    responder = NoiseXX(
        False, resp_static, prologue, _hex(vector, "resp_ephemeral"), hash_fn=HASHES[hash_name]
    )
    _run_vector_messages(initiator, responder, vector)
    assert initiator.remote_static == x25519_public_key(resp_static)
    assert responder.remote_static == x25519_public_key(init_static)
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]


# ------------------------------------------------------------------------------------------- helpers

I_STATIC = hashlib.sha256(b"test initiator static").digest()
R_STATIC = hashlib.sha256(b"test responder static").digest()


def _counter_entropy(label: bytes) -> Any:
    counter = iter(range(1 << 30))
    return lambda n: hashlib.blake2b(label + next(counter).to_bytes(4, "big"), digest_size=n).digest()


def _pair(prologue: bytes = b"p", resp_prologue: bytes | None = None) -> tuple[NoiseXX, NoiseXX]:
    return (
        NoiseXX(True, I_STATIC, prologue, entropy=_counter_entropy(b"i")),
        NoiseXX(
            False,
            R_STATIC,
            prologue if resp_prologue is None else resp_prologue,
            entropy=_counter_entropy(b"r"),
        ),
    )


def _handshake(initiator: NoiseXX, responder: NoiseXX) -> None:
    assert responder.read_message(initiator.write_message(b"")) == b""
    assert initiator.read_message(responder.write_message(b"two")) == b"two"
    assert responder.read_message(initiator.write_message(b"three")) == b"three"


# ------------------------------------------------------------------------------------------- handshake


def test_xx_roundtrip_with_entropy_source() -> None:
    initiator, responder = _pair()
    _handshake(initiator, responder)
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.remote_static == x25519_public_key(R_STATIC)
    assert responder.remote_static == x25519_public_key(I_STATIC)
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    assert r_recv.decrypt(b"ad", i_send.encrypt(b"ad", b"hello")) == b"hello"
    assert i_recv.decrypt(b"", r_send.encrypt(b"", b"world")) == b"world"


def test_ik_and_nn_facades_roundtrip() -> None:
    ik_i = NoiseIK(
        True, I_STATIC, b"x", remote_static=x25519_public_key(R_STATIC), entropy=_counter_entropy(b"a")
    )
    ik_r = NoiseIK(False, R_STATIC, b"x", entropy=_counter_entropy(b"b"))
    assert ik_r.read_message(ik_i.write_message(b"early")) == b"early"
    assert ik_r.remote_static == x25519_public_key(I_STATIC)
    assert ik_i.read_message(ik_r.write_message(b"")) == b""
    assert ik_i.complete and ik_r.complete and ik_i.handshake_hash == ik_r.handshake_hash
    nn_i, nn_r = NoiseNN(True, entropy=_counter_entropy(b"c")), NoiseNN(False, entropy=_counter_entropy(b"d"))
    nn_r.read_message(nn_i.write_message(b""))
    nn_i.read_message(nn_r.write_message(b""))
    assert nn_i.complete and nn_i.remote_static is None


def test_missing_entropy_or_keys_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        NoiseXX(True, I_STATIC)
    with pytest.raises(LocalProtocolError):
        NoiseXX(True, I_STATIC, b"", bytes(31))
    with pytest.raises(LocalProtocolError):
        NoiseIK(True, I_STATIC, b"", bytes(32))  # IK's initiator must know the responder's key
    with pytest.raises(LocalProtocolError):
        HandshakeState(XX, True, ephemeral_private=bytes(32))  # XX needs a static key
    bad = NoiseXX(True, I_STATIC, entropy=lambda n: bytes(n - 1))
    with pytest.raises(LocalProtocolError):
        bad.write_message(b"")


def test_given_ephemeral_is_the_one_sent() -> None:
    ephemeral = bytes(range(32))
    msg1 = NoiseXX(True, I_STATIC, b"", ephemeral).write_message(b"")
    assert msg1 == x25519_public_key(ephemeral)


def test_out_of_turn_is_local_error() -> None:
    initiator, responder = _pair()
    with pytest.raises(OutOfTurnError):
        initiator.read_message(bytes(32))
    with pytest.raises(OutOfTurnError):
        responder.write_message(b"")
    with pytest.raises(OutOfTurnError):
        initiator.split()
    msg1 = initiator.write_message(b"")
    with pytest.raises(OutOfTurnError):
        initiator.write_message(b"")
    responder.read_message(msg1)
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    for hs in (initiator, responder):
        with pytest.raises(OutOfTurnError):
            hs.write_message(b"")
        with pytest.raises(OutOfTurnError):
            hs.read_message(bytes(64))
    assert issubclass(OutOfTurnError, LocalProtocolError) and issubclass(OutOfTurnError, NoiseError)


def test_prologue_mismatch_fails_at_first_authenticated_message() -> None:
    initiator, responder = _pair(b"policymesh/v1\0alpha", b"policymesh/v1\0beta")
    responder.read_message(initiator.write_message(b""))
    msg2 = responder.write_message(b"cert")
    with pytest.raises(DecryptError):
        initiator.read_message(msg2)
    assert issubclass(DecryptError, RemoteProtocolError)


def test_failed_handshake_is_dead() -> None:
    initiator, responder = _pair()
    responder.read_message(initiator.write_message(b""))
    msg2 = bytearray(responder.write_message(b"cert"))
    msg2[40] ^= 1
    with pytest.raises(DecryptError):
        initiator.read_message(bytes(msg2))
    with pytest.raises(HandshakeFailedError):
        initiator.write_message(b"")
    with pytest.raises(HandshakeFailedError):
        initiator.read_message(bytes(msg2))
    with pytest.raises(HandshakeFailedError):
        _ = initiator.handshake_hash


@pytest.mark.parametrize("which", [1, 2])
def test_every_bit_flip_of_authenticated_handshake_message_is_refused(which: int) -> None:
    base_i, base_r = _pair()
    msg1 = base_i.write_message(b"")
    base_r.read_message(msg1)
    msg2 = base_r.write_message(b"cert-r")
    base_i.read_message(msg2)
    msg3 = base_i.write_message(b"cert-i")
    target = msg2 if which == 1 else msg3
    for bit in range(0, len(target) * 8, 3):
        initiator, responder = _pair()
        responder.read_message(initiator.write_message(b""))
        flipped = bytearray(target)
        flipped[bit // 8] ^= 1 << (bit % 8)
        if which == 1:
            receiver = initiator
            responder_msg2 = responder.write_message(b"cert-r")
            assert responder_msg2 == msg2  # deterministic entropy: same bytes every run
        else:
            initiator.read_message(responder.write_message(b"cert-r"))
            assert initiator.write_message(b"cert-i") == msg3
            receiver = responder
        with pytest.raises(RemoteProtocolError):
            receiver.read_message(bytes(flipped))


def test_truncated_handshake_message_is_malformed() -> None:
    initiator, responder = _pair()
    with pytest.raises(MalformedMessageError):
        responder.read_message(initiator.write_message(b"")[:31])
    initiator, responder = _pair()
    responder.read_message(initiator.write_message(b""))
    msg2 = responder.write_message(b"")
    for cut in (0, 31, 32, 79, len(msg2) - 1):
        fresh_i, fresh_r = _pair()
        fresh_r.read_message(fresh_i.write_message(b""))
        assert fresh_r.write_message(b"") == msg2
        with pytest.raises((MalformedMessageError, DecryptError)):
            fresh_i.read_message(msg2[:cut])


LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # p - 1
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # p, i.e. 0
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # p + 1, i.e. 1
]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8])
def test_low_order_ephemeral_is_refused(point: bytes) -> None:
    # responder side: msg1 carries only e; the DH happens as it writes msg2
    initiator, responder = _pair()
    responder.read_message(point)
    with pytest.raises(LowOrderPointError):
        responder.write_message(b"")
    with pytest.raises(HandshakeFailedError):
        responder.write_message(b"")
    # initiator side: msg2's e is used for ee while reading
    initiator, responder = _pair()
    responder.read_message(initiator.write_message(b""))
    msg2 = responder.write_message(b"")
    with pytest.raises(LowOrderPointError):
        initiator.read_message(point + msg2[32:])
    assert issubclass(LowOrderPointError, RemoteProtocolError)


def test_handshake_message_size_limit() -> None:
    initiator, responder = _pair()
    with pytest.raises(MessageTooLongError):
        initiator.write_message(bytes(MAX_MESSAGE_LEN - 32 + 1))
    msg1 = initiator.write_message(bytes(MAX_MESSAGE_LEN - 32))  # refused payload left the state intact
    assert len(msg1) == MAX_MESSAGE_LEN
    assert len(responder.read_message(msg1)) == MAX_MESSAGE_LEN - 32
    with pytest.raises(MessageTooLongError):  # e + encrypted s + tag = 32 + 48 + 16
        responder.write_message(bytes(MAX_MESSAGE_LEN - 96 + 1))
    msg2 = responder.write_message(bytes(MAX_MESSAGE_LEN - 96))
    assert len(msg2) == MAX_MESSAGE_LEN
    initiator.read_message(msg2)
    fresh = NoiseXX(False, R_STATIC, entropy=_counter_entropy(b"x"))
    with pytest.raises(MalformedMessageError):
        fresh.read_message(bytes(MAX_MESSAGE_LEN + 1))


# ------------------------------------------------------------------------------------------- CipherState


def _transport() -> tuple[CipherState, CipherState, CipherState, CipherState]:
    initiator, responder = _pair()
    _handshake(initiator, responder)
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    return i_send, i_recv, r_send, r_recv


def test_failed_decrypt_does_not_advance_nonce() -> None:
    send, _, _, recv = _transport()
    first = send.encrypt(b"", b"one")
    second = send.encrypt(b"", b"two")
    tampered = first[:-1] + bytes([first[-1] ^ 0x80])
    with pytest.raises(DecryptError):
        recv.decrypt(b"", tampered)
    with pytest.raises(DecryptError):
        recv.decrypt(b"", second)  # reordered: wrong nonce
    with pytest.raises(DecryptError):
        recv.decrypt(b"other ad", first)
    with pytest.raises(DecryptError):
        recv.decrypt(b"", first[: TAG_LEN - 1])
    assert recv.nonce == 0
    assert recv.decrypt(b"", first) == b"one"
    with pytest.raises(DecryptError):
        recv.decrypt(b"", first)  # replay
    assert recv.decrypt(b"", second) == b"two"
    assert recv.nonce == 2


def test_transport_size_limit() -> None:
    send, _, _, recv = _transport()
    with pytest.raises(MessageTooLongError):
        send.encrypt(b"", bytes(MAX_MESSAGE_LEN - TAG_LEN + 1))
    assert send.nonce == 0
    wire = send.encrypt(b"", bytes(MAX_MESSAGE_LEN - TAG_LEN))
    assert len(wire) == MAX_MESSAGE_LEN
    with pytest.raises(MalformedMessageError):
        recv.decrypt(b"", wire + b"\x00")
    assert recv.decrypt(b"", wire) == bytes(MAX_MESSAGE_LEN - TAG_LEN)


def test_nonce_exhaustion() -> None:
    send, _, _, recv = _transport()
    send.set_nonce(MAX_NONCE - 1)
    recv.set_nonce(MAX_NONCE - 1)
    assert recv.decrypt(b"", send.encrypt(b"", b"last")) == b"last"
    assert send.nonce == recv.nonce == MAX_NONCE
    with pytest.raises(NonceExhaustedError):
        send.encrypt(b"", b"one too many")
    with pytest.raises(NonceExhaustedError):
        recv.decrypt(b"", bytes(32))
    assert issubclass(NonceExhaustedError, LocalProtocolError)


def test_rekey_matches_spec_and_stays_in_step() -> None:
    key = bytes(range(32))
    max_nonce = b"\x00" * 4 + (2**64 - 1).to_bytes(8, "little")
    expected = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(bytes(32), b"", max_nonce, key)[:32]
    rekeyed = CipherState(key)
    rekeyed.set_nonce(7)
    rekeyed.rekey()
    assert rekeyed.nonce == 7  # rekey keeps n
    reference = CipherState(expected)
    reference.set_nonce(7)
    assert rekeyed.encrypt(b"a", b"payload") == reference.encrypt(b"a", b"payload")

    send, _, _, recv = _transport()
    send.rekey()
    wire = send.encrypt(b"", b"after rekey")
    with pytest.raises(DecryptError):
        recv.decrypt(b"", wire)  # one side only: out of step
    recv.rekey()
    assert recv.decrypt(b"", wire) == b"after rekey"
    with pytest.raises(LocalProtocolError):
        CipherState().rekey()


def test_keyless_cipherstate_passes_through() -> None:
    state = CipherState()
    assert not state.has_key()
    assert state.encrypt(b"ad", b"plain") == b"plain"
    assert state.decrypt(b"ad", b"plain") == b"plain"


def test_hkdf_against_independent_hmac() -> None:
    ck, ikm = bytes(range(64)), b"input key material"
    temp = hmac.new(ck, ikm, hashlib.blake2b).digest()
    out1 = hmac.new(temp, b"\x01", hashlib.blake2b).digest()
    out2 = hmac.new(temp, out1 + b"\x02", hashlib.blake2b).digest()
    out3 = hmac.new(temp, out2 + b"\x03", hashlib.blake2b).digest()
    assert hkdf(BLAKE2B, ck, ikm, 2) == (out1, out2)
    assert hkdf(BLAKE2B, ck, ikm, 3) == (out1, out2, out3)
    with pytest.raises(LocalProtocolError):
        hkdf(BLAKE2B, ck, ikm, 4)


@pytest.mark.parametrize("hash_fn", [BLAKE2B, SHA256], ids=lambda h: h.name)
@pytest.mark.parametrize("key_len", [0, 32, 64, 128, 129, 300])
def test_inlined_hmac_matches_stdlib(hash_fn: HashFunction, key_len: int) -> None:
    key, data = (bytes(range(256)) * 2)[:key_len], b"some data" * 7
    assert hash_fn.hmac(key, data) == hmac.new(key, data, hash_fn.constructor).digest()


# ------------------------------------------------------------------------------------------- fuzzing


def _stage(stage: int) -> HandshakeState:
    """A handshake state whose next call is read_message of message `stage` (0, 1 or 2)."""
    initiator, responder = _pair()
    if stage == 0:
        return responder
    responder.read_message(initiator.write_message(b""))
    if stage == 1:
        responder.write_message(b"cert")
        return initiator
    initiator.read_message(responder.write_message(b"cert"))
    initiator.write_message(b"cert")
    return responder


@settings(max_examples=300, deadline=None)
@given(stage=st.integers(0, 2), data=st.binary(max_size=300))
def test_read_message_raises_only_typed_errors(stage: int, data: bytes) -> None:
    hs = _stage(stage)
    try:
        hs.read_message(data)
    except NoiseError as exc:
        assert isinstance(exc, RemoteProtocolError)
        return
    # only message 1 (e, plaintext payload) is unauthenticated; anything else must not be accepted
    assert stage == 0 and len(data) >= 32


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_transport_decrypt_raises_only_typed_errors(data: bytes) -> None:
    _, _, _, recv = _transport()
    with pytest.raises(DecryptError):
        recv.decrypt(b"", data)
    assert recv.nonce == 0
