"""The Update Framework's attack matrix, ported to policymesh objects."""

from __future__ import annotations

import msgspec
import pytest

from protocol.errors import (
    EquivocationError,
    ExpiredError,
    FormatError,
    NotYetValidError,
    RevokedError,
    RollbackError,
    RootMismatchError,
    SignatureError,
)
from protocol.trust import (
    MAX_ENVELOPE_BYTES,
    Authority,
    Envelope,
    Revocations,
    Signature,
    TrustedState,
    add_signature,
    decode_envelope,
    decode_policy,
    encode,
    encode_envelope,
    payload_hash,
    sign,
    sign_certificate,
)
from protocol.trust.roots import RootChain
from simulations.identities import T0, derive_seed, make_authority, make_node
from tests.fixtures import sample_document, sign_sample

DAY = 86400


def reenvelope(data: bytes, **changes) -> bytes:
    env = decode_envelope(data, msgspec.msgpack.decode(data)["type"])
    return encode_envelope(msgspec.structs.replace(env, **changes))


@pytest.fixture
def auth() -> Authority:
    return make_authority()


@pytest.fixture
def trust(auth) -> TrustedState:
    return TrustedState(auth.root_bytes)


def test_valid_policy_accepted(auth, trust):
    check = trust.accept_policy(sign_sample(auth, 1), T0)
    assert check.policy.serial == 1 and not check.duplicate
    assert trust.serial == 1 and trust.policy_state(T0) == "fresh"


def test_unknown_key_rejected(auth, trust):
    doc, rev = sample_document()
    data = sign_sample(auth, 1)
    env = decode_envelope(data, "policy")
    forged = sign("policy", env.payload, [derive_seed("mallory")])
    with pytest.raises(SignatureError, match="0 valid signature"):
        trust.accept_policy(encode_envelope(forged), T0)
    assert trust.serial == 0


def test_below_threshold_rejected():
    auth = make_authority(policy_keys=3, policy_threshold=2)
    trust = TrustedState(auth.root_bytes)
    doc, rev = sample_document()
    one = auth.sign_policy(doc, 1, T0, T0 + DAY, rev, signers=1)
    with pytest.raises(SignatureError, match="1 valid signature.*threshold is 2"):
        trust.accept_policy(one, T0)
    two = auth.sign_policy(doc, 1, T0, T0 + DAY, rev, signers=2)
    assert trust.accept_policy(two, T0).policy.serial == 1


def test_cosign_reaches_threshold():
    auth = make_authority(policy_keys=3, policy_threshold=2)
    trust = TrustedState(auth.root_bytes)
    doc, rev = sample_document()
    env = decode_envelope(auth.sign_policy(doc, 1, T0, T0 + DAY, rev, signers=1), "policy")
    env2 = add_signature(env, auth.seeds["policy"][2])
    assert trust.accept_policy(encode_envelope(env2), T0).policy.serial == 1


def test_same_key_counted_once():
    auth = make_authority(policy_keys=3, policy_threshold=2)
    trust = TrustedState(auth.root_bytes)
    doc, rev = sample_document()
    data = auth.sign_policy(doc, 1, T0, T0 + DAY, rev, signers=1)
    env = decode_envelope(data, "policy")
    doubled = reenvelope(data, signatures=(env.signatures[0], env.signatures[0], env.signatures[0]))
    with pytest.raises(SignatureError, match="1 valid signature"):
        trust.accept_policy(doubled, T0)


def test_signature_stripped(auth, trust):
    with pytest.raises(SignatureError):
        trust.accept_policy(reenvelope(sign_sample(auth, 1), signatures=()), T0)


def test_garbage_signature_ignored(auth, trust):
    data = sign_sample(auth, 1)
    env = decode_envelope(data, "policy")
    bad = Signature(env.signatures[0].key_id, b"\x00" * 64)
    with pytest.raises(SignatureError):
        trust.accept_policy(reenvelope(data, signatures=(bad,)), T0)


def test_tampered_payload(auth, trust):
    data = sign_sample(auth, 1)
    env = decode_envelope(data, "policy")
    pv = decode_policy(env.payload)
    evil = msgspec.structs.replace(pv, serial=2)
    with pytest.raises(SignatureError):
        trust.accept_policy(reenvelope(data, payload=encode(evil)), T0)
    flipped = bytearray(env.payload)
    flipped[-1] ^= 1
    with pytest.raises((SignatureError, FormatError)):
        trust.accept_policy(reenvelope(data, payload=bytes(flipped)), T0)


def test_certificate_presented_as_policy(auth, trust):
    node = make_node(auth, "n1")
    with pytest.raises(FormatError, match="expected a signed policy"):
        trust.accept_policy(node.cert_bytes, T0)
    # Relabel the cert envelope as a policy: the domain separation makes the signature fail.
    relabelled = reenvelope(node.cert_bytes, type="policy")
    with pytest.raises((SignatureError, FormatError)):
        trust.accept_policy(relabelled, T0)


def test_policy_key_cannot_sign_certificates(auth, trust):
    node = make_node(auth, "n1")
    cert = msgspec.msgpack.decode(decode_envelope(node.cert_bytes, "cert").payload)
    from protocol.trust import Certificate

    forged = sign_certificate(msgspec.convert(cert, Certificate), auth.seeds["policy"])
    with pytest.raises(SignatureError):
        trust.verify_certificate(forged, T0)


def test_rollback_rejected(auth, trust):
    trust.accept_policy(sign_sample(auth, 5), T0)
    with pytest.raises(RollbackError, match="serial 4 is older than the trusted serial 5"):
        trust.accept_policy(sign_sample(auth, 4), T0)
    assert trust.serial == 5


def test_duplicate_vs_equivocation(auth, trust):
    first = sign_sample(auth, 3)
    trust.accept_policy(first, T0)
    assert trust.accept_policy(first, T0 + 10).duplicate
    other = sign_sample(auth, 3, revocations=Revocations(nodes=("n9",)))
    # Equivocation: the lower content hash wins everywhere; the higher one is refused and remembered.
    low, high = sorted((first, other), key=lambda e: payload_hash(decode_envelope(e, "policy").payload))
    fresh = TrustedState(auth.root_bytes)
    fresh.accept_policy(low, T0)
    with pytest.raises(EquivocationError, match="signed twice with different content"):
        fresh.accept_policy(high, T0)
    assert fresh.policy_hash == payload_hash(decode_envelope(low, "policy").payload)
    assert fresh.equivocation is not None and len(fresh.equivocation.hashes) == 2


def test_expired_policy_rejected_as_new_input(auth, trust):
    data = sign_sample(auth, 1, now=T0 - 10 * DAY, valid_s=DAY)
    with pytest.raises(ExpiredError, match="expired"):
        trust.accept_policy(data, T0)


def test_fail_static_when_applied_policy_expires(auth, trust):
    trust.accept_policy(sign_sample(auth, 1, valid_s=DAY), T0)
    later = T0 + 3 * DAY
    assert trust.policy_state(later) == "stale"
    assert trust.serial == 1  # still enforced
    assert trust.accept_policy(sign_sample(auth, 2, now=later), later).policy.serial == 2
    assert trust.policy_state(later) == "fresh"


def test_clock_skew_both_ways(auth):
    trust = TrustedState(auth.root_bytes, skew_s=120)
    # Node clock 100 s behind the signer: issued_at is "in the future" but within tolerance.
    assert trust.accept_policy(sign_sample(auth, 1, now=T0 + 100), T0).policy.serial == 1
    with pytest.raises(NotYetValidError, match="in the future"):
        trust.accept_policy(sign_sample(auth, 2, now=T0 + 1000), T0)
    # Node clock ahead: a policy that expired 100 s ago is within tolerance, 1000 s is not.
    data = sign_sample(auth, 3, now=T0 - DAY, valid_s=DAY - 100)
    assert trust.accept_policy(data, T0).policy.serial == 3
    with pytest.raises(ExpiredError):
        trust.accept_policy(sign_sample(auth, 4, now=T0 - DAY, valid_s=DAY - 1000), T0)


def test_fast_forward_recovery(auth, trust):
    leaked = sign_sample(auth, 2**62)
    trust.accept_policy(leaked, T0)
    with pytest.raises(RollbackError):
        trust.accept_policy(sign_sample(auth, 10), T0)
    new_root = auth.rotate(T0, new_seeds={"policy": [derive_seed("policy-after-leak")]})
    assert trust.update_root(new_root)
    assert trust.policy_state(T0) == "stale"  # signed by keys the root no longer trusts
    recovered = sign_sample(auth, 10)
    assert trust.accept_policy(recovered, T0).policy.serial == 10
    assert trust.policy_state(T0) == "fresh"


def test_rotation_without_policy_key_change_keeps_floor(auth, trust):
    trust.accept_policy(sign_sample(auth, 7), T0)
    trust.update_root(auth.rotate(T0, new_seeds={"enroll": [derive_seed("enroll2")]}))
    with pytest.raises(RollbackError):
        trust.accept_policy(sign_sample(auth, 6), T0)
    assert trust.accept_policy(sign_sample(auth, 8), T0).policy.serial == 8


def test_policy_under_old_root_version_rejected(auth, trust):
    old = sign_sample(auth, 1)
    trust.update_root(auth.rotate(T0))
    with pytest.raises(RootMismatchError, match="root v1"):
        trust.accept_policy(old, T0)


def test_policy_under_newer_root_asks_for_roots(auth, trust):
    auth.rotate(T0, new_seeds={"policy": [derive_seed("p2")]})
    with pytest.raises(RootMismatchError) as err:
        trust.accept_policy(sign_sample(auth, 1), T0)
    assert err.value.needed_version == 2


def test_policy_from_other_authority(trust):
    other = make_authority(label="other")
    with pytest.raises(SignatureError):
        trust.accept_policy(sign_sample(other, 1), T0)


def test_other_cluster_same_keys():
    a = make_authority(cluster="alpha", label="same")
    b = make_authority(cluster="beta", label="same")
    trust = TrustedState(a.root_bytes)
    with pytest.raises(SignatureError, match="cluster"):
        trust.accept_policy(sign_sample(b, 1), T0)


# -- root rotation --------------------------------------------------------------------------------


def test_rotation_1_of_1(auth, trust):
    r2 = auth.rotate(T0, new_seeds={"root": [derive_seed("root2")]})
    assert trust.update_root(r2) and trust.root_version == 2
    assert not trust.update_root(r2)  # duplicate


def test_rotation_needs_old_keys():
    auth = make_authority()
    trust = TrustedState(auth.root_bytes)
    r2 = auth.rotate(T0, new_seeds={"root": [derive_seed("root2")]}, sign_with_old=0)
    with pytest.raises(SignatureError, match="keys of root v1"):
        trust.update_root(r2)


def test_rotation_needs_new_keys():
    auth = make_authority()
    trust = TrustedState(auth.root_bytes)
    r2 = auth.rotate(T0, new_seeds={"root": [derive_seed("root2")]}, sign_with_new=0)
    with pytest.raises(SignatureError, match="its own root keys"):
        trust.update_root(r2)


def test_rotation_3_of_5():
    auth = make_authority(root_keys=5, root_threshold=3)
    trust = TrustedState(auth.root_bytes)
    new = {"root": [derive_seed("r2", i) for i in range(5)]}
    # 2 old signatures: refused.
    bad = Authority(auth.cluster, dict(auth.seeds), dict(auth.thresholds), auth.root, list(auth.roots))
    with pytest.raises(SignatureError):
        trust.update_root(bad.rotate(T0, new_seeds=new, sign_with_old=2))
    # 3 old + 2 new: refused.
    bad = Authority(auth.cluster, dict(auth.seeds), dict(auth.thresholds), auth.root, list(auth.roots))
    with pytest.raises(SignatureError):
        trust.update_root(bad.rotate(T0, new_seeds=new, sign_with_new=2))
    assert trust.update_root(auth.rotate(T0, new_seeds=new))
    assert trust.root_version == 2


def test_root_chain_keeps_the_exact_bytes_of_every_trusted_root(auth):
    anchor = auth.root_bytes
    chain = RootChain(anchor)
    r2, r3 = auth.rotate(T0), auth.rotate(T0)
    assert chain.add(r2) and chain.add(r3) and not chain.add(r2)  # r2 again: a duplicate, no change
    assert chain.envelopes() == [anchor, r2, r3] and chain.root_envelope == r3
    assert chain.envelope(1) == anchor and chain.envelope(4) is None and chain.root.version == 3
    chain.check_fresh(chain.root.expires, 0)
    with pytest.raises(ExpiredError, match="trusted root v3 expired"):
        chain.check_fresh(chain.root.expires + 301, 300)


def test_root_version_must_step_by_one(auth, trust):
    auth.rotate(T0)
    r3 = auth.rotate(T0)
    with pytest.raises(RootMismatchError) as err:
        trust.update_root(r3)
    assert err.value.needed_version == 2


def test_root_rollback_and_equivocation(auth, trust):
    r2 = auth.rotate(T0)
    trust.update_root(r2)
    with pytest.raises(RollbackError):
        # A root v1 that we do not have (different content but same version as the anchor) is equivocation;
        # an older version we never had is rollback.
        trust.update_root(make_authority(label="x").root_bytes)
    other_v2 = Authority(auth.cluster, dict(auth.seeds), dict(auth.thresholds), auth.root, list(auth.roots))
    other_v2.root = msgspec.structs.replace(other_v2.root, version=1)
    with pytest.raises(EquivocationError):
        trust.update_root(other_v2.rotate(T0 + 5))


def test_offline_node_crosses_five_rotations_with_expired_intermediates():
    auth = make_authority(root_keys=5, root_threshold=3, expires_in_s=DAY)
    trust = TrustedState(auth.root_bytes)
    chain = []
    for i in range(5):
        chain.append(
            auth.rotate(T0 + i, new_seeds={"root": [derive_seed("gen", i, k) for k in range(5)]}, expires_in_s=DAY)
        )
    # Intermediate roots have long expired; the final one is fresh at `now`.
    final = auth.rotate(T0 + 100 * DAY, new_seeds={"policy": [derive_seed("p-final")]}, expires_in_s=DAY)
    chain.append(final)
    now = T0 + 100 * DAY
    assert trust.update_root_chain(chain) == 6
    trust.check_root_fresh(now)
    assert trust.root_version == 7
    assert trust.accept_policy(sign_sample(auth, 1, now=now), now).policy.serial == 1


def test_expired_final_root_refuses_new_policy():
    auth = make_authority(expires_in_s=DAY)
    trust = TrustedState(auth.root_bytes)
    later = T0 + 30 * DAY
    with pytest.raises(ExpiredError, match="trusted root v1 expired"):
        trust.check_root_fresh(later)
    with pytest.raises(ExpiredError, match="root"):
        trust.accept_policy(sign_sample(auth, 1, now=later), later)


def test_anchor_must_be_self_signed(auth):
    env = decode_envelope(auth.root_bytes, "root")
    with pytest.raises(SignatureError):
        TrustedState(encode_envelope(Envelope(type="root", payload=env.payload)))


# -- certificates ----------------------------------------------------------------------------------


def test_certificate_validity_and_revocation(auth, trust):
    node = make_node(auth, "n1", valid_s=DAY)
    assert trust.verify_certificate(node.cert_bytes, T0).node_id == "n1"
    with pytest.raises(ExpiredError):
        trust.verify_certificate(node.cert_bytes, T0 + 2 * DAY)
    future = make_node(auth, "n2", not_before=T0 + DAY, label="future")
    with pytest.raises(NotYetValidError):
        trust.verify_certificate(future.cert_bytes, T0)
    trust.accept_policy(sign_sample(auth, 1, revocations=Revocations(nodes=("n1",))), T0)
    with pytest.raises(RevokedError, match="node n1 is revoked"):
        trust.verify_certificate(node.cert_bytes, T0)
    n3 = make_node(auth, "n3")
    trust.accept_policy(sign_sample(auth, 2, revocations=Revocations(certs=(n3.cert.cert_id,))), T0)
    with pytest.raises(RevokedError, match="certificate"):
        trust.verify_certificate(n3.cert_bytes, T0)


def test_certificate_from_other_authority(trust):
    other = make_authority(label="other")
    with pytest.raises(SignatureError):
        trust.verify_certificate(make_node(other, "n1").cert_bytes, T0)


# -- decoding limits -------------------------------------------------------------------------------


def test_oversize_rejected_before_decoding(auth, trust):
    huge = b"\x00" * (MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(FormatError, match="over the"):
        trust.accept_policy(huge, T0)
    with pytest.raises(FormatError, match="over the"):
        trust.update_root(huge)
    with pytest.raises(FormatError, match="over the"):
        trust.verify_certificate(huge, T0)


def test_truncated_envelope(auth, trust):
    data = sign_sample(auth, 1)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            trust.accept_policy(data[:cut], T0)


def test_decode_policy_keeps_the_last_result_and_still_refuses_what_differs(auth):
    """The last decoded payload's result is reused (a body is decoded twice in a row when it arrives):
    the same bytes give the same policy, and any other bytes (truncated, altered) are decoded and checked
    on their own."""
    from protocol.trust.metadata import decode_policy
    from protocol.trust.signing import decode_envelope

    payload = decode_envelope(sign_sample(auth, 3), "policy").payload
    first = decode_policy(payload)
    assert decode_policy(bytes(payload)) is first and first.serial == 3
    with pytest.raises(FormatError):
        decode_policy(payload[:-3])
    other = decode_envelope(sign_sample(auth, 4), "policy").payload
    assert decode_policy(other).serial == 4 and decode_policy(payload).serial == 3
