"""SecureSession: XX handshake with certificates, chunked transport, rekey, deadlines, rate limits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel import (
    CHUNK_BYTES,
    HANDSHAKE_TIMEOUT_MS,
    ConnectionKind,
    Event,
    FrameError,
    HandshakeComplete,
    HandshakeRateLimiter,
    HandshakeTimeoutError,
    KeyMismatchError,
    LocalIdentity,
    MessageReceived,
    MessageTooLargeError,
    PeerClosed,
    PeerMessageTooLargeError,
    SecureSession,
    SessionClosedError,
    SessionState,
    UnexpectedPeerError,
    prologue_for,
)
from protocol.channel.noise import MAX_MESSAGE_LEN, CipherState, DecryptError, MalformedMessageError, NoiseXX
from protocol.errors import (
    ExpiredError,
    LocalProtocolError,
    MeshError,
    NotYetValidError,
    RemoteProtocolError,
    RevokedError,
    RoleError,
    SignatureError,
    TrustError,
)
from protocol.trust import DAY_S, Authority, Revocations, TrustedState
from simulations.identities import T0, NodeIdentity, derive_seed, make_authority, make_node
from tests.fixtures import sign_sample

NOW_MS = 5_000
GOSSIP = frozenset({ConnectionKind.GOSSIP})
ANY_KIND = frozenset({ConnectionKind.GOSSIP, ConnectionKind.OPERATOR})


def entropy_for(label: str) -> Callable[[int], bytes]:
    counter = iter(range(1 << 30))
    return lambda n: hashlib.blake2b(f"{label}/{next(counter)}".encode(), digest_size=n).digest()


def session(ident: NodeIdentity, trust: TrustedState, initiator: bool, **kwargs: object) -> SecureSession:
    return SecureSession(
        initiator=initiator,
        trust=trust,
        identity=LocalIdentity(ident.static_private, ident.cert_bytes),
        entropy=entropy_for(f"{ident.node_id}/{initiator}"),
        now_ms=NOW_MS,
        **kwargs,  # type: ignore[arg-type]
    )


def pump(src: SecureSession, dst: SecureSession, wall_s: float = T0, now_ms: int = NOW_MS + 1) -> list[Event]:
    events: list[Event] = []
    for frame in src.frames_to_send():
        assert len(frame) <= MAX_MESSAGE_LEN
        events.extend(dst.receive_frame(frame, now_ms, wall_s))
    return events


def connect(a: SecureSession, b: SecureSession, wall_s: float = T0) -> tuple[list[Event], list[Event]]:
    """a initiates, b accepts; returns the events each side saw."""
    b_events = pump(a, b, wall_s)  # -> e
    a_events = pump(b, a, wall_s)  # <- e, ee, s, es + b's certificate
    b_events += pump(a, b, wall_s)  # -> s, se + a's certificate
    return a_events, b_events


def deliver(frames: list[bytes], dst: SecureSession) -> list[Event]:
    events: list[Event] = []
    for frame in frames:
        events.extend(dst.receive_frame(frame, NOW_MS, T0))
    return events


@dataclass
class Mesh:
    auth: Authority
    trust: TrustedState
    a: NodeIdentity
    b: NodeIdentity
    op: NodeIdentity

    def fresh_trust(self) -> TrustedState:
        return TrustedState(self.auth.root_bytes)


@pytest.fixture
def mesh() -> Mesh:
    auth = make_authority()
    return Mesh(
        auth,
        TrustedState(auth.root_bytes),
        make_node(auth, "node-a", roles=("app",)),
        make_node(auth, "node-b", roles=("db",)),
        make_node(auth, "ops-1", roles=("operator",)),
    )


def open_pair(mesh: Mesh, **kwargs: object) -> tuple[SecureSession, SecureSession]:
    a = session(mesh.a, mesh.fresh_trust(), True, **kwargs)
    b = session(mesh.b, mesh.fresh_trust(), False, **kwargs)
    connect(a, b)
    assert a.state is SessionState.OPEN and b.state is SessionState.OPEN
    return a, b


# ------------------------------------------------------------------------------------------- handshake


def test_valid_pair_connects_and_exchanges_messages(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(mesh.b, mesh.fresh_trust(), False)
    assert b.frames_to_send() == []  # the acceptor speaks second
    a_events, b_events = connect(a, b)
    [a_done] = a_events
    [b_done] = b_events
    assert isinstance(a_done, HandshakeComplete) and isinstance(b_done, HandshakeComplete)
    assert a_done.peer == mesh.b.cert and b_done.peer == mesh.a.cert
    assert a_done.kind is b_done.kind is ConnectionKind.GOSSIP
    assert a_done.handshake_hash == b_done.handshake_hash == a.handshake_hash
    assert a.peer_certificate == mesh.b.cert_bytes and b.peer == mesh.a.cert
    assert a.deadline() is None and b.deadline() is None

    for message in (b"", b"x", bytes(range(256)) * 1000, bytes(CHUNK_BYTES), bytes(CHUNK_BYTES + 1)):
        frames = a.send_message(message)
        assert len(frames) == max(1, -(-len(message) // CHUNK_BYTES))
        assert deliver(frames, b) == [MessageReceived(message)]
        assert deliver(b.send_message(message[::-1]), a) == [MessageReceived(message[::-1])]


def test_handshake_frames_carry_no_plaintext_certificate(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(mesh.b, mesh.fresh_trust(), False)
    wire: list[bytes] = []
    for src, dst in ((a, b), (b, a), (a, b)):
        for frame in src.frames_to_send():
            wire.append(frame)
            dst.receive_frame(frame, NOW_MS, T0)
    assert len(wire) == 3 and len(wire[0]) == 32
    for frame in wire:
        assert b"node-a" not in frame and b"node-b" not in frame


def test_operator_connection(mesh: Mesh) -> None:
    op = session(mesh.op, mesh.fresh_trust(), True, accept=frozenset({ConnectionKind.OPERATOR}))
    node = session(mesh.b, mesh.fresh_trust(), False, accept=ANY_KIND)
    op_events, node_events = connect(op, node)
    assert isinstance(node_events[0], HandshakeComplete) and node_events[0].kind is ConnectionKind.OPERATOR
    assert op.kind is node.kind is ConnectionKind.OPERATOR
    assert deliver(op.send_message(b"publish"), node) == [MessageReceived(b"publish")]


def test_operator_refused_on_gossip_only_listener(mesh: Mesh) -> None:
    op = session(mesh.op, mesh.fresh_trust(), True, accept=frozenset({ConnectionKind.OPERATOR}))
    node = session(mesh.b, mesh.fresh_trust(), False, accept=GOSSIP)
    pump(op, node)
    pump(node, op)
    with pytest.raises(RoleError):
        pump(op, node)
    assert node.state is SessionState.FAILED


def test_node_refused_on_operator_only_listener(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    node = session(mesh.b, mesh.fresh_trust(), False, accept=frozenset({ConnectionKind.OPERATOR}))
    pump(a, node)
    pump(node, a)
    with pytest.raises(RoleError):
        pump(a, node)


def test_mixed_operator_and_node_roles_refused(mesh: Mesh) -> None:
    mixed = make_node(mesh.auth, "mixed", roles=("app", "operator"))
    with pytest.raises(LocalProtocolError):
        session(mixed, mesh.fresh_trust(), True, accept=ANY_KIND)  # our own certificate: a local error
    raw = RawPeer(True, mixed, mesh.auth.cluster)
    node = session(mesh.b, mesh.fresh_trust(), False, accept=ANY_KIND)
    with pytest.raises(RoleError):
        raw.run_as_initiator(node)


def test_local_misconfiguration_is_local_error(mesh: Mesh) -> None:
    with pytest.raises(LocalProtocolError):  # certificate for another static key
        LocalIdentity(mesh.b.static_private, mesh.a.cert_bytes)
    with pytest.raises(LocalProtocolError):  # operators only connect out
        session(mesh.op, mesh.fresh_trust(), False, accept=ANY_KIND)
    with pytest.raises(LocalProtocolError):  # a node opening an operator connection
        session(mesh.a, mesh.fresh_trust(), True, accept=frozenset({ConnectionKind.OPERATOR}))
    with pytest.raises(LocalProtocolError):  # not a certificate at all
        LocalIdentity(mesh.a.static_private, b"junk")
    with pytest.raises(LocalProtocolError):  # a policy envelope is not a certificate
        LocalIdentity(mesh.a.static_private, sign_sample(mesh.auth, 1))
    a = session(mesh.a, mesh.fresh_trust(), True)
    with pytest.raises(LocalProtocolError):
        a.send_message(b"too early")


def test_identity_from_raw_parts(mesh: Mesh) -> None:
    a = SecureSession(
        initiator=True,
        trust=mesh.fresh_trust(),
        static_private=mesh.a.static_private,
        certificate=mesh.a.cert_bytes,
        entropy=entropy_for("parts"),
        now_ms=NOW_MS,
    )
    b = session(mesh.b, mesh.fresh_trust(), False)
    connect(a, b)
    assert a.state is SessionState.OPEN and b.peer == mesh.a.cert
    with pytest.raises(LocalProtocolError):
        SecureSession(initiator=True, trust=mesh.trust, entropy=entropy_for("x"), now_ms=0)
    with pytest.raises(LocalProtocolError):
        SecureSession(
            initiator=True,
            trust=mesh.trust,
            identity=LocalIdentity(mesh.a.static_private, mesh.a.cert_bytes),
            certificate=mesh.b.cert_bytes,
            entropy=entropy_for("x"),
            now_ms=0,
        )


@pytest.mark.parametrize("bad_side", ["initiator", "responder"])
def test_certificate_from_another_authority(mesh: Mesh, bad_side: str) -> None:
    rogue_auth = make_authority(label="rogue")  # same cluster name, other keys
    assert rogue_auth.cluster == mesh.auth.cluster
    rogue = make_node(rogue_auth, "node-r")
    a_ident, b_ident = (rogue, mesh.b) if bad_side == "initiator" else (mesh.a, rogue)
    # the rogue side is willing to talk to anyone of the real cluster; the honest side must refuse it
    a, b = session(a_ident, mesh.fresh_trust(), True), session(b_ident, mesh.fresh_trust(), False)
    with pytest.raises(SignatureError):
        connect(a, b)
    honest = a if bad_side == "responder" else b
    assert honest.state is SessionState.FAILED


@pytest.mark.parametrize("bad_side", ["initiator", "responder"])
def test_expired_certificate(mesh: Mesh, bad_side: str) -> None:
    old = make_node(mesh.auth, "node-old", now=T0 - 30 * DAY_S, valid_s=DAY_S)
    a_ident, b_ident = (old, mesh.b) if bad_side == "initiator" else (mesh.a, old)
    a, b = session(a_ident, mesh.fresh_trust(), True), session(b_ident, mesh.fresh_trust(), False)
    with pytest.raises(ExpiredError):
        connect(a, b)


def test_not_yet_valid_certificate(mesh: Mesh) -> None:
    future = make_node(mesh.auth, "node-future", not_before=T0 + DAY_S)
    a, b = session(mesh.a, mesh.fresh_trust(), True), session(future, mesh.fresh_trust(), False)
    with pytest.raises(NotYetValidError):
        connect(a, b)


def test_validity_uses_the_wall_clock_parameter(mesh: Mesh) -> None:
    a, b = session(mesh.a, mesh.fresh_trust(), True), session(mesh.b, mesh.fresh_trust(), False)
    with pytest.raises(ExpiredError):
        connect(a, b, wall_s=T0 + 2 * 365 * DAY_S)


@pytest.mark.parametrize("by", ["node", "cert"])
@pytest.mark.parametrize("bad_side", ["initiator", "responder"])
def test_revoked_certificate(mesh: Mesh, by: str, bad_side: str) -> None:
    victim = mesh.a if bad_side == "initiator" else mesh.b
    revocations = (
        Revocations(nodes=(victim.node_id,)) if by == "node" else Revocations(certs=(victim.cert.cert_id,))
    )
    policy = sign_sample(mesh.auth, 1, revocations=revocations)
    trusts = [mesh.fresh_trust(), mesh.fresh_trust()]
    for trust in trusts:
        trust.accept_policy(policy, T0)
    a, b = session(mesh.a, trusts[0], True), session(mesh.b, trusts[1], False)
    with pytest.raises(RevokedError):
        connect(a, b)


def test_revalidate_after_new_policy(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    a.revalidate(T0 + 10)  # still fine
    a._trust.accept_policy(sign_sample(mesh.auth, 2, revocations=Revocations(nodes=("node-b",))), T0)
    with pytest.raises(RevokedError):
        a.revalidate(T0 + 10)
    assert a.state is SessionState.FAILED
    with pytest.raises(SessionClosedError):
        a.send_message(b"x")
    b.revalidate(T0)
    with pytest.raises(ExpiredError):
        b.revalidate(T0 + 2 * 365 * DAY_S)


def test_revalidate_checks_the_signature_again_only_under_a_new_root(mesh: Mesh) -> None:
    """Periodic revalidation under the same root re-checks what time and policy change (not the signature,
    checked at the handshake over the same bytes); once a new root replaces the enroll keys, the peer's
    certificate, signed by the old key, no longer holds."""
    a, _ = open_pair(mesh)
    a.revalidate(T0 + 10)
    a._trust.update_root(mesh.auth.rotate(T0, new_seeds={"enroll": [derive_seed("enroll-rotated")]}))
    with pytest.raises(SignatureError):
        a.revalidate(T0 + 10)
    assert a.state is SessionState.FAILED


def test_wrong_cluster_name_fails_in_the_noise_layer(mesh: Mesh) -> None:
    # same authority keys, other cluster name: only the prologue can catch it before certificates are read
    other = make_authority(cluster="other")
    assert other.seeds == mesh.auth.seeds
    b_other = make_node(other, "node-b", roles=("db",))
    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(b_other, TrustedState(other.root_bytes), False)
    pump(a, b)
    with pytest.raises(DecryptError):
        pump(b, a)
    assert prologue_for("other") != prologue_for(mesh.auth.cluster)


def test_expected_peer(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True, expected_peer="node-c")
    b = session(mesh.b, mesh.fresh_trust(), False)
    with pytest.raises(UnexpectedPeerError):
        connect(a, b)
    a = session(mesh.a, mesh.fresh_trust(), True, expected_peer="node-b")
    b = session(mesh.b, mesh.fresh_trust(), False)
    connect(a, b)
    assert a.state is SessionState.OPEN


# ------------------------------------------------------------------------------------------- malicious peers


class RawPeer:
    """A peer that drives NoiseXX by hand: it may hold one static key and present any certificate."""

    def __init__(
        self, initiator: bool, ident: NodeIdentity, cluster: str, static_private: bytes | None = None
    ):
        self.ident = ident
        self.noise = NoiseXX(
            initiator,
            static_private or ident.static_private,
            prologue_for(cluster),
            entropy=entropy_for(f"raw/{ident.node_id}"),
        )

    def run_as_initiator(self, responder: SecureSession, first_payload: bytes = b"") -> list[Event]:
        responder.receive_frame(self.noise.write_message(first_payload), NOW_MS, T0)
        [msg2] = responder.frames_to_send()
        self.noise.read_message(msg2)
        return responder.receive_frame(self.noise.write_message(self.ident.cert_bytes), NOW_MS, T0)

    def run_as_responder(self, initiator: SecureSession) -> list[Event]:
        [msg1] = initiator.frames_to_send()
        self.noise.read_message(msg1)
        return initiator.receive_frame(self.noise.write_message(self.ident.cert_bytes), NOW_MS, T0)

    def transport(self) -> tuple[CipherState, CipherState]:
        return self.noise.split()


ATTACKER_STATIC = hashlib.sha256(b"attacker static").digest()


def test_stolen_certificate_refused_by_responder(mesh: Mesh) -> None:
    thief = RawPeer(True, mesh.a, mesh.auth.cluster, static_private=ATTACKER_STATIC)
    b = session(mesh.b, mesh.fresh_trust(), False)
    with pytest.raises(KeyMismatchError):
        thief.run_as_initiator(b)
    assert b.state is SessionState.FAILED and b.peer is None


def test_stolen_certificate_refused_by_initiator(mesh: Mesh) -> None:
    thief = RawPeer(False, mesh.b, mesh.auth.cluster, static_private=ATTACKER_STATIC)
    a = session(mesh.a, mesh.fresh_trust(), True)
    with pytest.raises(KeyMismatchError):
        thief.run_as_responder(a)
    assert a.frames_to_send() == []  # our certificate was never sent to the impostor


def test_operator_cannot_pose_as_responder(mesh: Mesh) -> None:
    raw = RawPeer(False, mesh.op, mesh.auth.cluster)
    a = session(mesh.a, mesh.fresh_trust(), True)
    with pytest.raises(RoleError):
        raw.run_as_responder(a)


def test_first_handshake_message_must_be_empty(mesh: Mesh) -> None:
    raw = RawPeer(True, mesh.a, mesh.auth.cluster)
    b = session(mesh.b, mesh.fresh_trust(), False)
    with pytest.raises(FrameError):
        raw.run_as_initiator(b, first_payload=b"plaintext smuggled before authentication")


def test_raw_peer_with_valid_identity_interoperates(mesh: Mesh) -> None:
    """The byte format is plain Noise XX: a hand-driven NoiseXX with a genuine certificate connects."""
    raw = RawPeer(True, mesh.a, mesh.auth.cluster)
    b = session(mesh.b, mesh.fresh_trust(), False)
    [done] = raw.run_as_initiator(b)
    assert isinstance(done, HandshakeComplete) and done.handshake_hash == raw.noise.handshake_hash
    send, recv = raw.transport()
    assert b.receive_frame(send.encrypt(b"", b"\x01hello"), NOW_MS, T0) == [MessageReceived(b"hello")]
    [frame] = b.send_message(b"back")
    assert recv.decrypt(b"", frame) == b"\x01back"


# ------------------------------------------------------------------------------------------- corrupted frames


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("damage", ["truncate", "flip", "extend"])
def test_damaged_handshake_frame(mesh: Mesh, which: int, damage: str) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(mesh.b, mesh.fresh_trust(), False)
    order = [(a, b), (b, a), (a, b)]
    for index, (src, dst) in enumerate(order):
        [frame] = src.frames_to_send()
        if index == which:
            if damage == "truncate":
                frame = frame[: len(frame) // 2] if index else frame[:31]
            elif damage == "flip":
                frame = frame[:-5] + bytes([frame[-5] ^ 0x10]) + frame[-4:]
            else:
                frame = frame + b"\x00"
            if which == 0 and damage == "extend":
                with pytest.raises(FrameError):  # message 1 carries no payload
                    dst.receive_frame(frame, NOW_MS, T0)
                return
            if which == 0 and damage == "flip":
                # message 1 is an unauthenticated ephemeral key: the damage shows when message 2 fails
                dst.receive_frame(frame, NOW_MS, T0)
                with pytest.raises(DecryptError):
                    pump(b, a)
                return
            with pytest.raises((DecryptError, MalformedMessageError)):
                dst.receive_frame(frame, NOW_MS, T0)
            assert dst.state is SessionState.FAILED
            with pytest.raises(SessionClosedError):
                dst.receive_frame(frame, NOW_MS, T0)
            return
        dst.receive_frame(frame, NOW_MS, T0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "oversize"])
def test_damaged_transport_frame_kills_session(mesh: Mesh, damage: str) -> None:
    a, b = open_pair(mesh)
    [frame] = a.send_message(b"payload")
    if damage == "truncate":
        bad = frame[:-1]
    elif damage == "flip":
        bad = bytes([frame[0] ^ 1]) + frame[1:]
    elif damage == "empty":
        bad = b""
    else:
        bad = frame + bytes(MAX_MESSAGE_LEN)
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(bad, NOW_MS, T0)
    assert b.state is SessionState.FAILED
    with pytest.raises(SessionClosedError):
        b.receive_frame(frame, NOW_MS, T0)  # the genuine frame is no longer accepted either


def test_replayed_frame_kills_session(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    [first] = a.send_message(b"one")
    assert deliver([first], b) == [MessageReceived(b"one")]
    with pytest.raises(DecryptError):
        b.receive_frame(first, NOW_MS, T0)
    assert b.state is SessionState.FAILED


def test_reordered_frames_kill_session(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    [first] = a.send_message(b"one")
    [second] = a.send_message(b"two")
    with pytest.raises(DecryptError):
        b.receive_frame(second, NOW_MS, T0)
    with pytest.raises(SessionClosedError):
        b.receive_frame(first, NOW_MS, T0)


def test_dropped_chunk_kills_session(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    frames = a.send_message(bytes(3 * CHUNK_BYTES))
    assert len(frames) == 3
    deliver(frames[:1], b)
    with pytest.raises(DecryptError):
        deliver(frames[2:], b)


# ------------------------------------------------------------------------------------------- size caps


def test_oversize_message_refused_by_receiver(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)  # default 16 MiB cap
    b = session(mesh.b, mesh.fresh_trust(), False, max_message_bytes=100_000)
    connect(a, b)
    assert deliver(a.send_message(bytes(100_000)), b) == [MessageReceived(bytes(100_000))]
    frames = a.send_message(bytes(100_001))
    with pytest.raises(PeerMessageTooLargeError):
        deliver(frames, b)
    assert b.state is SessionState.FAILED


def test_oversize_message_refused_by_sender(mesh: Mesh) -> None:
    a, b = open_pair(mesh, max_message_bytes=1000)
    with pytest.raises(MessageTooLargeError):
        a.send_message(bytes(1001))
    assert isinstance(MessageTooLargeError("x"), LocalProtocolError)
    assert deliver(a.send_message(bytes(1000)), b) == [MessageReceived(bytes(1000))]  # still usable


def test_cap_per_connection_kind(mesh: Mesh) -> None:
    """A node reassembles gossip under the gossip cap and operator requests under the operator cap."""
    caps = {ConnectionKind.GOSSIP: 5000, ConnectionKind.OPERATOR: 50_000}
    op = session(mesh.op, mesh.fresh_trust(), True, accept=frozenset({ConnectionKind.OPERATOR}))
    node = session(mesh.b, mesh.fresh_trust(), False, accept=ANY_KIND, max_message_bytes=caps)
    connect(op, node)
    assert node.max_message_bytes == 50_000
    assert deliver(op.send_message(bytes(50_000)), node) == [MessageReceived(bytes(50_000))]

    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(mesh.b, mesh.fresh_trust(), False, accept=ANY_KIND, max_message_bytes=caps)
    connect(a, b)
    assert b.max_message_bytes == 5000
    assert deliver(a.send_message(bytes(5000)), b) == [MessageReceived(bytes(5000))]
    with pytest.raises(PeerMessageTooLargeError):
        deliver(a.send_message(bytes(CHUNK_BYTES + 1)), b)
    with pytest.raises(LocalProtocolError):
        session(mesh.b, mesh.fresh_trust(), False, accept=ANY_KIND,
                max_message_bytes={ConnectionKind.GOSSIP: 5000})


def test_default_cap_is_16_mib(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    big = bytes(16 * 1024 * 1024)
    assert deliver(a.send_message(big), b) == [MessageReceived(big)]
    with pytest.raises(MessageTooLargeError):
        a.send_message(big + b"\x00")


# ------------------------------------------------------------------------------------------- rekey, close


def test_rekey_every_n_frames_in_step(mesh: Mesh) -> None:
    a, b = open_pair(mesh, rekey_interval=3)
    for i in range(20):
        assert deliver(a.send_message(b"a%d" % i), b) == [MessageReceived(b"a%d" % i)]
        assert deliver(b.send_message(b"b%d" % i), a) == [MessageReceived(b"b%d" % i)]


def test_rekey_actually_changes_keys(mesh: Mesh) -> None:
    """A receiver that rekeys on another schedule fails exactly at the first rekeyed frame."""
    a = session(mesh.a, mesh.fresh_trust(), True, rekey_interval=3)
    b = session(mesh.b, mesh.fresh_trust(), False, rekey_interval=1000)
    connect(a, b)
    for i in range(3):
        deliver(a.send_message(b"%d" % i), b)
    with pytest.raises(DecryptError):
        deliver(a.send_message(b"after rekey"), b)


def test_close_is_delivered(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    frames = a.close("shutting down")
    assert a.state is SessionState.CLOSED
    assert deliver(frames, b) == [PeerClosed("shutting down")]
    assert b.state is SessionState.CLOSED
    with pytest.raises(SessionClosedError):
        a.send_message(b"x")
    with pytest.raises(SessionClosedError):
        a.receive_frame(b"x" * 40, NOW_MS, T0)
    with pytest.raises(SessionClosedError):
        b.send_message(b"x")
    with pytest.raises(FrameError):
        b.receive_frame(b"x" * 40, NOW_MS, T0)  # a frame after the peer said goodbye
    with pytest.raises(LocalProtocolError):
        session(mesh.a, mesh.fresh_trust(), True).close("x" * 300)


def test_close_during_handshake_sends_nothing(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    assert a.close("bye") == []  # the queued first frame is dropped too
    assert a.state is SessionState.CLOSED and a.deadline() is None


# ------------------------------------------------------------------------------------------- deadlines


def test_handshake_deadline(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True, handshake_timeout_ms=2_000)
    assert a.deadline() == NOW_MS + 2_000
    a.handle_timer(NOW_MS + 1_999)
    assert a.state is SessionState.HANDSHAKE
    with pytest.raises(HandshakeTimeoutError):
        a.handle_timer(NOW_MS + 2_000)
    assert a.state is SessionState.FAILED and a.deadline() is None


def test_late_handshake_frame_is_refused(mesh: Mesh) -> None:
    a = session(mesh.a, mesh.fresh_trust(), True)
    b = session(mesh.b, mesh.fresh_trust(), False)
    assert b.deadline() == NOW_MS + HANDSHAKE_TIMEOUT_MS
    with pytest.raises(HandshakeTimeoutError):
        pump(a, b, now_ms=NOW_MS + HANDSHAKE_TIMEOUT_MS)


def test_deadline_does_not_apply_once_open(mesh: Mesh) -> None:
    a, b = open_pair(mesh)
    late = NOW_MS + 10 * HANDSHAKE_TIMEOUT_MS
    a.handle_timer(late)
    assert b.receive_frame(a.send_message(b"x")[0], late, T0 + 3600) == [MessageReceived(b"x")]


# ------------------------------------------------------------------------------------------- rate limiter


def test_rate_limiter_burst_and_refill() -> None:
    limiter = HandshakeRateLimiter(rate_per_s=2, burst=3)
    assert [limiter.allow("10.0.0.1", 0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("10.0.0.2", 0)  # per source
    assert not limiter.allow("10.0.0.1", 499)
    assert limiter.allow("10.0.0.1", 500)  # 2/s: one token after 500 ms; refusals cost nothing
    assert not limiter.allow("10.0.0.1", 500)
    assert not limiter.allow("10.0.0.1", 999)
    assert limiter.allow("10.0.0.1", 1000)
    assert [limiter.allow("10.0.0.1", 10_000) for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_ignores_clock_going_back() -> None:
    limiter = HandshakeRateLimiter(rate_per_s=1, burst=1)
    assert limiter.allow("s", 10_000)
    assert not limiter.allow("s", 0)
    assert not limiter.allow("s", 10_999)
    assert limiter.allow("s", 11_000)


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = HandshakeRateLimiter(rate_per_s=1, burst=1, max_sources=100)
    for i in range(10_000):
        assert limiter.allow(f"src-{i}", i)
        assert len(limiter) <= 100
    assert not limiter.allow("src-9999", 9_999)  # recent sources keep their state


def test_rate_limiter_total_cap() -> None:
    limiter = HandshakeRateLimiter(rate_per_s=100, burst=5, total_rate_per_s=10, total_burst=10)
    allowed = sum(limiter.allow(f"src-{i}", 0) for i in range(50))
    assert allowed == 10
    assert limiter.allow("src-new", 100)  # 1 token refilled at 10/s after 100 ms
    assert not limiter.allow("src-other", 100)


def test_rate_limiter_rejects_bad_parameters() -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeRateLimiter(rate_per_s=0, burst=1)
    with pytest.raises(LocalProtocolError):
        HandshakeRateLimiter(rate_per_s=1, burst=0)


# ------------------------------------------------------------------------------------------- fuzzing


def _expect_peer_blame(call: Callable[[], object]) -> None:
    try:
        call()
    except (RemoteProtocolError, TrustError):
        return
    except MeshError as exc:  # a LocalProtocolError would blame us for the peer's bytes
        raise AssertionError(f"wrong blame: {exc!r}") from exc


@pytest.fixture(scope="module")
def module_mesh() -> Mesh:
    auth = make_authority()
    return Mesh(
        auth,
        TrustedState(auth.root_bytes),
        make_node(auth, "node-a"),
        make_node(auth, "node-b"),
        make_node(auth, "ops-1", roles=("operator",)),
    )


def _session_at(mesh: Mesh, stage: int) -> SecureSession:
    """A session whose next receive_frame is handshake message `stage` (0-2) or transport (3)."""
    a = session(mesh.a, mesh.trust, True)
    b = session(mesh.b, mesh.trust, False)
    if stage == 0:
        return b
    pump(a, b)
    if stage == 1:
        return a
    pump(b, a)
    if stage == 2:
        return b
    pump(a, b)
    return b


@settings(max_examples=300, deadline=None)
@given(stage=st.integers(0, 3), frames=st.lists(st.binary(max_size=400), min_size=1, max_size=3))
def test_arbitrary_frames_raise_only_typed_errors(module_mesh: Mesh, stage: int, frames: list[bytes]) -> None:
    s = _session_at(module_mesh, stage)
    for frame in frames:
        if s.state is SessionState.FAILED:
            with pytest.raises(SessionClosedError):
                s.receive_frame(frame, NOW_MS, T0)
            continue
        _expect_peer_blame(lambda f=frame: s.receive_frame(f, NOW_MS, T0))


@settings(max_examples=300, deadline=None)
@given(plaintexts=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_authenticated_garbage_raises_only_typed_errors(module_mesh: Mesh, plaintexts: list[bytes]) -> None:
    """An authenticated peer that frames its plaintexts arbitrarily (the decoder behind the AEAD)."""
    raw = RawPeer(True, module_mesh.a, module_mesh.auth.cluster)
    b = session(module_mesh.b, module_mesh.trust, False, max_message_bytes=500)
    raw.run_as_initiator(b)
    send, _ = raw.transport()
    for plaintext in plaintexts:
        if b.state is not SessionState.OPEN:
            break
        frame = send.encrypt(b"", plaintext)
        try:
            events = b.receive_frame(frame, NOW_MS, T0)
        except (FrameError, PeerMessageTooLargeError):
            assert b.state is SessionState.FAILED
            continue
        for event in events:
            assert isinstance(event, MessageReceived | PeerClosed)
            if isinstance(event, MessageReceived):
                assert len(event.data) <= 500


def test_an_open_session_gives_both_sides_matching_datagram_keys(mesh: Mesh) -> None:
    from protocol.channel.datagram import DatagramChannel

    a, b = open_pair(mesh)
    ka, kb = a.datagram_keys(), b.datagram_keys()
    assert ka.send_key == kb.recv_key and ka.recv_id == kb.send_id
    assert DatagramChannel(kb).open(DatagramChannel(ka).seal(b"digest")) == b"digest"
