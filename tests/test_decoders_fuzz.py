"""Random bytes fed to every decoder only ever raise the typed error."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import FormatError, TrustError
from protocol.trust import (
    Envelope,
    Signature,
    TrustedState,
    decode_certificate,
    decode_envelope,
    decode_policy,
    decode_root,
    encode_envelope,
)
from simulations.identities import T0, make_authority, make_node
from tests.fixtures import sign_sample

AUTH = make_authority()
NODE = make_node(AUTH, "n1")
POLICY = sign_sample(AUTH, 1)

settings.register_profile("ci", max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("ci")


def feed_everywhere(data: bytes) -> TrustedState:
    trust = TrustedState(AUTH.root_bytes)
    for name, args in (("accept_policy", (data, T0)), ("update_root", (data,)), ("verify_certificate", (data, T0))):
        try:
            getattr(trust, name)(*args)
        except TrustError:
            pass
    return trust


@given(st.binary(max_size=2048))
def test_payload_decoders(data):
    for decoder in (decode_root, decode_policy, decode_certificate):
        try:
            decoder(data)
        except FormatError:
            pass


@given(st.binary(max_size=2048), st.sampled_from(["root", "policy", "cert", "member"]))
def test_envelope_decoder(data, kind):
    try:
        decode_envelope(data, kind)
    except FormatError:
        pass


@given(st.binary(max_size=4096))
def test_trusted_state_entry_points(data):
    trust = feed_everywhere(data)
    assert trust.serial == 0 and trust.root_version == 1


@st.composite
def mutated(draw, base: bytes):
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    return bytes(b)


@given(mutated(POLICY))
def test_mutated_policy_never_accepted_unless_identical_payload(data):
    trust = TrustedState(AUTH.root_bytes)
    try:
        check = trust.accept_policy(data, T0)
    except TrustError:
        return
    # Only mutations that keep the signed payload intact may pass (e.g. in the signature list order).
    assert decode_envelope(data, "policy").payload == decode_envelope(POLICY, "policy").payload
    assert check.policy.serial == 1


@given(st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=80)), max_size=5), st.binary(max_size=300))
def test_structured_garbage_envelopes(sigs, payload):
    for kind in ("root", "policy", "cert"):
        env = Envelope(type=kind, payload=payload, signatures=tuple(Signature(k, s) for k, s in sigs))
        trust = feed_everywhere(encode_envelope(env))
        assert trust.serial == 0 and trust.root_version == 1


def test_msgpack_of_wrong_shape():
    for obj in ({"type": "policy"}, [1, 2, 3], {"type": "policy", "payload": "str"}, None, 5):
        data = msgspec.msgpack.encode(obj)
        try:
            decode_envelope(data, "policy")
        except FormatError:
            continue
        raise AssertionError(f"{obj!r} decoded")


_sel = st.one_of(
    st.sampled_from(["role:app", "role:*", "role:db", "node:n1", "cidr:10.0.0.0/8", "role:", "node:!", "x:y", "role:a b"]),
    st.text(max_size=12),
)
_port = st.one_of(st.sampled_from(["tcp/1", "udp/65535", "tcp/10-20", "tcp/20-10", "icmp", "tcp/0", "tcp/65536",
                                   "tcp/01", "sctp/5"]), st.text(max_size=10))


@given(
    st.lists(
        st.tuples(st.text(max_size=8), st.lists(_sel, max_size=3), st.lists(_sel, max_size=3), st.lists(_port, max_size=3),
                  st.sampled_from([None, "log", "enforce", "x"])),
        max_size=4,
    ),
    st.sampled_from(["drop", "reject", "accept"]),
)
def test_fast_canonical_check_agrees_with_full_validation(rules, inbound):
    from protocol.errors import PolicyError
    from protocol.trust.policy import Defaults, PolicyDocument, Rule, is_canonical, validate_document

    doc = PolicyDocument(
        defaults=Defaults(inbound=inbound),
        allow=tuple(Rule(name=n, sources=tuple(sorted(set(f))), to=tuple(sorted(set(t))), ports=tuple(sorted(set(p))), mode=m)
                    for n, f, t, p, m in rules),
    )
    if is_canonical(doc):
        try:
            assert validate_document(doc) == doc
        except PolicyError as exc:  # pragma: no cover - the assertion is the point
            raise AssertionError(f"fast path accepted an invalid document: {exc}") from None
