"""Trust: what the authority signs and how a node decides to believe it.

* ``signing``   envelopes (payload + Ed25519 signatures), thresholds, key ids.
* ``metadata``  the signed types: root, policy version, node/operator certificate.
* ``policy``    the policy document operators write in TOML: validation, canonical form.
* ``names``     names, addresses and numbers as signed objects spell them, checked whole.
* ``authority`` building and signing roots, certificates and policy versions (the operator's side).
* ``roots``     ``RootChain``: the verified roots from the pinned anchor on (rotation, rollback,
                equivocation, expiry of the final root).
* ``state``     ``TrustedState``: the root chain and the policy a node holds, and the checks that keep
                a forged, older, equivocated or tampered version out; certificates checked against both.

The shells import from here (``from protocol.trust import TrustedState, decode_envelope``).
"""

from protocol.trust.authority import (
    DAY_S,
    Authority,
    build_policy,
    build_root,
    sign_certificate,
    sign_policy,
    sign_root,
    x25519_public,
)
from protocol.trust.metadata import (
    ROLE_NAMES,
    Certificate,
    PolicyVersion,
    Root,
    decode_certificate,
    decode_policy,
    decode_root,
    encode,
    payload_hash,
)
from protocol.trust.policy import (
    MAX_RULES,
    Defaults,
    PolicyDocument,
    Revocations,
    Rule,
    parse_policy_toml,
    to_toml,
    validate_document,
)
from protocol.trust.signing import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    Signature,
    add_signature,
    decode_envelope,
    encode_envelope,
    key_id,
    public_key_of,
    sign,
    signing_message,
    valid_signers,
)
from protocol.trust.state import (
    DEFAULT_SKEW_S,
    MAX_EQUIVOCATION_HASHES,
    MAX_ROOT_STEPS,
    Equivocation,
    PolicyCheck,
    TrustedState,
)

__all__ = [
    "DAY_S",
    "DEFAULT_SKEW_S",
    "MAX_ENVELOPE_BYTES",
    "MAX_EQUIVOCATION_HASHES",
    "MAX_ROOT_STEPS",
    "MAX_RULES",
    "ROLE_NAMES",
    "Authority",
    "Certificate",
    "Defaults",
    "Envelope",
    "Equivocation",
    "PolicyCheck",
    "PolicyDocument",
    "PolicyVersion",
    "Revocations",
    "Root",
    "Rule",
    "Signature",
    "TrustedState",
    "add_signature",
    "build_policy",
    "build_root",
    "decode_certificate",
    "decode_envelope",
    "decode_policy",
    "decode_root",
    "encode",
    "encode_envelope",
    "key_id",
    "parse_policy_toml",
    "payload_hash",
    "public_key_of",
    "sign",
    "sign_certificate",
    "sign_policy",
    "sign_root",
    "signing_message",
    "to_toml",
    "valid_signers",
    "validate_document",
    "x25519_public",
]
