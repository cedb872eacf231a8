"""Authority operations: build and sign roots, certificates and policy versions.

Pure functions over seeds (32-byte Ed25519 private seeds); the caller supplies entropy and time.
``meshctl`` uses these with keys from disk; tests use them with deterministic seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nacl.public import PrivateKey

from protocol.trust.metadata import MAX_SERIAL, Certificate, PolicyVersion, Role, Root, encode
from protocol.trust.policy import PolicyDocument, Revocations, validate_document, validate_revocations
from protocol.trust.signing import encode_envelope, key_id, public_key_of, sign

DAY_S = 86400


def x25519_public(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


def build_root(
    cluster: str,
    version: int,
    expires: int,
    role_keys: Mapping[str, Sequence[bytes]],
    thresholds: Mapping[str, int],
) -> Root:
    """``role_keys`` maps role name to public keys."""
    keys: dict[str, bytes] = {}
    roles: dict[str, Role] = {}
    for role, pubs in role_keys.items():
        kids = []
        for pub in pubs:
            kid = key_id(pub)
            keys[kid] = pub
            kids.append(kid)
        roles[role] = Role(keyids=tuple(kids), threshold=thresholds[role])
    return Root(cluster=cluster, version=version, expires=expires, keys=keys, roles=roles)


def sign_root(root: Root, seeds: Sequence[bytes]) -> bytes:
    return encode_envelope(sign("root", encode(root), list(seeds)))


def sign_certificate(cert: Certificate, seeds: Sequence[bytes]) -> bytes:
    return encode_envelope(sign("cert", encode(cert), list(seeds)))


def build_policy(
    cluster: str,
    serial: int,
    issued_at: int,
    expires_at: int,
    root_version: int,
    document: PolicyDocument,
    revocations: Revocations | None = None,
) -> PolicyVersion:
    if not 1 <= serial <= MAX_SERIAL:
        raise ValueError(f"serial must be 1..{MAX_SERIAL}")
    if expires_at <= issued_at:
        raise ValueError("expiry must be after issue time")
    return PolicyVersion(
        cluster=cluster,
        serial=serial,
        issued_at=issued_at,
        expires_at=expires_at,
        root_version=root_version,
        document=validate_document(document),
        revocations=validate_revocations(revocations or Revocations()),
    )


def sign_policy(pv: PolicyVersion, seeds: Sequence[bytes]) -> bytes:
    return encode_envelope(sign("policy", encode(pv), list(seeds)))


@dataclass
class Authority:
    """An authority whose private seeds are all at hand (tests, the demo, a single-holder setup)."""

    cluster: str
    seeds: dict[str, list[bytes]]
    thresholds: dict[str, int]
    root: Root
    roots: list[bytes] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        cluster: str,
        seeds: Mapping[str, Sequence[bytes]],
        thresholds: Mapping[str, int],
        now: int,
        expires_in_s: int = 365 * DAY_S,
    ) -> Authority:
        pubs = {r: [public_key_of(s) for s in ss] for r, ss in seeds.items()}
        root = build_root(cluster, 1, now + expires_in_s, pubs, thresholds)
        auth = cls(cluster, {r: list(s) for r, s in seeds.items()}, dict(thresholds), root)
        auth.roots.append(sign_root(root, auth.seeds["root"][: thresholds["root"]]))
        return auth

    @property
    def root_bytes(self) -> bytes:
        return self.roots[-1]

    def rotate(
        self,
        now: int,
        new_seeds: Mapping[str, Sequence[bytes]] | None = None,
        thresholds: Mapping[str, int] | None = None,
        expires_in_s: int = 365 * DAY_S,
        sign_with_old: int | None = None,
        sign_with_new: int | None = None,
    ) -> bytes:
        """Make root N+1 replacing the seeds of the given roles; signed by old and new root keys."""
        old_root_seeds = self.seeds["root"]
        seeds = {r: list(s) for r, s in self.seeds.items()}
        seeds.update({r: list(s) for r, s in (new_seeds or {}).items()})
        ths = dict(self.thresholds)
        ths.update(thresholds or {})
        pubs = {r: [public_key_of(s) for s in ss] for r, ss in seeds.items()}
        root = build_root(self.cluster, self.root.version + 1, now + expires_in_s, pubs, ths)
        n_old = self.thresholds["root"] if sign_with_old is None else sign_with_old
        n_new = ths["root"] if sign_with_new is None else sign_with_new
        signers = list(dict.fromkeys([*old_root_seeds[:n_old], *seeds["root"][:n_new]]))
        data = sign_root(root, signers)
        self.seeds, self.thresholds, self.root = seeds, ths, root
        self.roots.append(data)
        return data

    def enroll(
        self,
        node_id: str,
        region: str,
        roles: Sequence[str],
        addresses: Sequence[str],
        identity_public: bytes,
        static_public: bytes,
        not_before: int,
        not_after: int,
        cert_id: str,
    ) -> bytes:
        cert = Certificate(
            cluster=self.cluster,
            node_id=node_id,
            region=region,
            roles=tuple(roles),
            addresses=tuple(addresses),
            identity_key=identity_public,
            static_key=static_public,
            not_before=not_before,
            not_after=not_after,
            cert_id=cert_id,
        )
        return sign_certificate(cert, self.seeds["enroll"][: self.thresholds["enroll"]])

    def sign_policy(
        self,
        document: PolicyDocument,
        serial: int,
        issued_at: int,
        expires_at: int,
        revocations: Revocations | None = None,
        signers: int | None = None,
    ) -> bytes:
        pv = build_policy(self.cluster, serial, issued_at, expires_at, self.root.version, document, revocations)
        n = self.thresholds["policy"] if signers is None else signers
        return sign_policy(pv, self.seeds["policy"][:n])
