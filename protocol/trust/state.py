"""TrustedState: which roots, policies and certificates a node may trust (TUF semantics, one stream).

Takes bytes only; time (wall-clock seconds) is a parameter.  Load order and rollback rules:

* Roots: the anchor (pinned out of band) and each root N+1 signed by a threshold of root N's root keys
  and of its own, versions stepping by one; expiry checked on the final root only
  (``check_root_fresh``).  The chain and its rules are ``RootChain`` in ``protocol.trust.roots``.
* A policy needs a threshold of the ``policy`` role, the trusted root's version and cluster, a serial
  above the stored one (equal serial + same payload = duplicate), and must be within its validity
  (``skew_s`` tolerance both ways).
* Equal serial + other payload, both validly signed, is an **equivocation**.  Every node converges on
  one deterministic choice, the lower content hash: a lower hash at the trusted serial replaces the
  trusted policy (a new version for persistence, enforcement and gossip), a higher one is refused with
  :class:`EquivocationError`.  Either way the equivocation (serial and both hashes) is remembered until
  a higher serial supersedes it, so a node changes at most once per serial and never flip-flops.
* When a new root changes the ``policy`` role's keys, the serial floor resets (fast-forward recovery).
* An applied policy that expires keeps being enforced (fail-static); ``policy_state`` says ``stale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from protocol.trust.metadata import (
    Certificate,
    PolicyVersion,
    Root,
    decode_certificate,
    decode_policy,
    payload_hash,
)
from protocol.trust.roots import RootChain
from protocol.trust.signing import Envelope, decode_envelope, require_threshold

DEFAULT_SKEW_S = 300
MAX_ROOT_STEPS = 1024
MAX_EQUIVOCATION_HASHES = 4  # distinct validly signed payloads remembered for one equivocated serial


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """Outcome of checking a policy envelope that did not raise."""

    policy: PolicyVersion
    hash: str
    envelope_bytes: bytes
    duplicate: bool
    replaces: str | None = None  # equivocation: the higher hash this lower-hash policy replaces


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Validly signed, different payloads seen for one serial; ``hashes`` sorted, the lowest (the
    one every node converges on) first."""

    root_version: int
    serial: int
    hashes: tuple[str, ...]


def _role_signature(root: Root, role: str) -> tuple[frozenset[str], int, tuple[bytes, ...]]:
    r = root.roles[role]
    return frozenset(r.keyids), r.threshold, tuple(sorted(root.keys[k] for k in r.keyids))


class TrustedState:
    def __init__(self, anchor: bytes, *, skew_s: int = DEFAULT_SKEW_S,
                 verified: dict[tuple[bytes, bytes], Any] | None = None) -> None:
        """``verified``: results of the signature and format checks, keyed by the exact bytes checked
        and the exact root they were checked against, shared by the many nodes a simulator hosts in one
        process (a check depends on nothing else).  Only what passed enters it; the rules that depend
        on this node's state (serial floor, equivocation, expiry, root version) always run.  The
        daemon passes none."""
        self._verified = verified
        self._chain = RootChain(anchor, verified)
        self.skew_s = skew_s
        self._policy: PolicyCheck | None = None
        # Serial floor: policies must exceed it. Reset when the policy role's keys change.
        self._floor_serial = 0
        self._floor_hash: str | None = None
        self._policy_under_current_keys = False
        self.equivocation: Equivocation | None = None

    # -- roots --------------------------------------------------------------------------------------
    @property
    def root(self) -> Root:
        return self._chain.root

    @property
    def cluster(self) -> str:
        return self.root.cluster

    @property
    def root_version(self) -> int:
        return self.root.version

    def root_chain(self) -> list[bytes]:
        """Exact signed bytes of every trusted root, oldest first (the anchor included)."""
        return self._chain.envelopes()

    def root_bytes(self, version: int) -> bytes | None:
        return self._chain.envelope(version)

    def update_root(self, data: bytes) -> bool:
        """Trust root N+1. Returns False for a duplicate of a trusted root; raises TrustError otherwise."""
        before = self.root
        if not self._chain.add(data):
            return False
        if _role_signature(before, "policy") != _role_signature(self.root, "policy"):
            # Fast-forward recovery: a leaked policy key could have pushed the serial to 2^62.
            self._floor_serial = 0
            self._floor_hash = None
            self._policy_under_current_keys = False
        return True

    def update_root_chain(self, chain: list[bytes]) -> int:
        """Apply roots in version order, skipping those already trusted. Returns how many were new."""
        added = 0
        for data in chain[:MAX_ROOT_STEPS]:
            if self.update_root(data):
                added += 1
        return added

    def check_root_fresh(self, now: float) -> None:
        self._chain.check_fresh(now, self.skew_s)

    # -- policy -------------------------------------------------------------------------------------
    @property
    def policy(self) -> PolicyVersion | None:
        return self._policy.policy if self._policy else None

    @property
    def policy_hash(self) -> str | None:
        return self._policy.hash if self._policy else None

    @property
    def policy_bytes(self) -> bytes | None:
        return self._policy.envelope_bytes if self._policy else None

    @property
    def serial(self) -> int:
        return self._policy.policy.serial if self._policy else 0

    @property
    def serial_floor(self) -> int:
        """Policies must carry a serial above this (equal: duplicate or equivocation). It equals
        ``serial`` except after a rotation of the policy keys, when it is 0 (fast-forward recovery)."""
        return self._floor_serial

    def check_policy(self, data: bytes, now: float, *, allow_expired: bool = False) -> PolicyCheck:
        """Verify a policy envelope against the trusted root and the stored policy; no state change.

        ``allow_expired`` is only for re-loading the node's own last-known-good policy at boot
        (fail-static); new input from anywhere else is always checked for expiry."""
        root = self.root
        key = (data, self._chain.root_envelope)
        hit = self._verified.get(key) if self._verified is not None else None
        if hit is not None:  # the same bytes passed the same checks against the same root
            env, pv, digest, data = hit  # and the first copy of them is kept, not this one (one per node)
        else:
            env, pv, digest = self._check_policy_signed(data, root)
            if self._verified is not None:
                self._verified[key] = (env, pv, digest, data)
        return self._check_policy_rules(data, pv, digest, root, now, allow_expired)

    def verified_claims(self, data: bytes) -> tuple[int, str, int] | None:
        """(serial, payload hash, root version) of a policy envelope whose exact bytes already passed
        the signature and format checks against the trusted root (see ``verified``), else None."""
        hit = self._verified.get((data, self._chain.root_envelope)) if self._verified is not None else None
        return None if hit is None else (hit[1].serial, hit[2], hit[1].root_version)

    def _check_policy_signed(self, data: bytes, root: Root) -> tuple[Envelope, PolicyVersion, str]:
        """The signature and format checks of ``check_policy`` (a function of the bytes and the root)."""
        env = decode_envelope(data, "policy")
        # Peek at root_version/serial only after signatures verify: decode needs the payload, but we
        # verify signatures over the exact bytes first and refuse anything that does not verify.
        role = root.roles["policy"]
        try:
            require_threshold(env, root.keys, root.role_keys("policy"), role.threshold, "policy")
        except SignatureError:
            # Maybe it is signed under a newer root that we do not have yet: tell the caller which.
            try:
                pv_peek = decode_policy(env.payload)
            except FormatError:
                raise
            if pv_peek.cluster == root.cluster and pv_peek.root_version > root.version:
                raise RootMismatchError(
                    f"policy serial {pv_peek.serial} needs root v{pv_peek.root_version}; trusted root is "
                    f"v{root.version}",
                    needed_version=pv_peek.root_version,
                ) from None
            if pv_peek.cluster == root.cluster and pv_peek.root_version < root.version:
                raise RootMismatchError(
                    f"policy serial {pv_peek.serial} was signed under root v{pv_peek.root_version} by keys the "
                    f"trusted root v{root.version} no longer lists"
                ) from None
            raise
        pv = decode_policy(env.payload)
        return env, pv, payload_hash(env.payload)

    def _check_policy_rules(self, data: bytes, pv: PolicyVersion, digest: str, root: Root,
                            now: float, allow_expired: bool) -> PolicyCheck:
        """The rules of ``check_policy`` that depend on this node's state and clock."""
        if pv.cluster != root.cluster:
            raise SignatureError(f"policy serial {pv.serial} is for cluster {pv.cluster!r}, not {root.cluster!r}")
        if pv.root_version != root.version:
            raise RootMismatchError(
                f"policy serial {pv.serial} was signed under root v{pv.root_version}; trusted root is "
                f"v{root.version}",
                needed_version=pv.root_version if pv.root_version > root.version else None,
            )
        if pv.serial < self._floor_serial:
            raise RollbackError(f"policy serial {pv.serial} is older than the trusted serial {self._floor_serial}")
        replaces = None
        if pv.serial == self._floor_serial and self._floor_hash is not None:
            if digest == self._floor_hash:
                return PolicyCheck(pv, digest, bytes(data), duplicate=True)
            if digest > self._floor_hash:
                raise EquivocationError(
                    f"policy serial {pv.serial} was signed twice with different content "
                    f"({digest[:12]} vs trusted {self._floor_hash[:12]}): a policy key is compromised or "
                    "misused; the lower content hash is kept"
                )
            replaces = self._floor_hash  # the lower hash wins; still checked for validity below
        if allow_expired:
            return PolicyCheck(pv, digest, bytes(data), duplicate=False, replaces=replaces)
        self.check_root_fresh(now)
        if pv.issued_at > now + self.skew_s:
            raise NotYetValidError(
                f"policy serial {pv.serial} is issued {int(pv.issued_at - now)} s in the future "
                f"(skew tolerance {self.skew_s} s)"
            )
        if pv.expires_at < now - self.skew_s:
            raise ExpiredError(f"policy serial {pv.serial} expired {int(now - pv.expires_at)} s ago")
        return PolicyCheck(pv, digest, bytes(data), duplicate=False, replaces=replaces)

    def accept_policy(self, data: bytes, now: float) -> PolicyCheck:
        """Check and, unless it is a duplicate, make it the current policy.  A validly signed policy
        with the trusted serial and a different payload is remembered as an equivocation (see the
        module docstring) whether it replaces the trusted one (lower hash) or is refused."""
        try:
            check = self.check_policy(data, now)
        except EquivocationError:
            pv = self._policy.policy if self._policy else None
            if pv is not None and self._floor_hash is not None:
                self._note_equivocation(pv.root_version, pv.serial, self._floor_hash,
                                        payload_hash(decode_envelope(data, "policy").payload))
            raise
        if check.replaces is not None:
            self._note_equivocation(check.policy.root_version, check.policy.serial, check.replaces, check.hash)
        return self._install(check)

    def knows_equivocating(self, serial: int, digest: str) -> bool:
        """``digest`` is a validly signed payload of ``serial`` already seen and refused (or replaced)."""
        e = self.equivocation
        return e is not None and e.serial == serial and digest in e.hashes and digest != self.policy_hash

    def _note_equivocation(self, root_version: int, serial: int, a: str, b: str) -> None:
        e = self.equivocation
        same = e is not None and e.serial == serial and e.root_version == root_version
        seen = set(e.hashes) if e is not None and same else set()
        seen.update((a, b))
        self.equivocation = Equivocation(root_version, serial, tuple(sorted(seen)[:MAX_EQUIVOCATION_HASHES]))

    def restore_expired_policy(self, data: bytes, now: float) -> PolicyCheck:
        """Boot path: reinstall the stored last-known-good policy even if it has expired (fail-static).
        Signatures, cluster, root version and serial order are still checked."""
        return self._install(self.check_policy(data, now, allow_expired=True))

    def _install(self, check: PolicyCheck) -> PolicyCheck:
        if not check.duplicate:
            e = self.equivocation
            if e is not None and (check.policy.root_version, check.policy.serial) > (e.root_version, e.serial):
                self.equivocation = None  # superseded by a higher version
            self._policy = check
            self._floor_serial = check.policy.serial
            self._floor_hash = check.hash
            self._policy_under_current_keys = True
        return check

    def policy_state(self, now: float) -> str:
        """``none`` (nothing trusted yet), ``fresh``, or ``stale`` (expired but still enforced,
        or signed by policy keys the current root no longer trusts)."""
        if self._policy is None:
            return "none"
        if self._policy.policy.expires_at < now - self.skew_s or not self._policy_under_current_keys:
            return "stale"
        return "fresh"

    # -- certificates -------------------------------------------------------------------------------
    def check_certificate(self, data: bytes) -> Certificate:
        """Signature and format only (validity window and revocation are checked by verify_certificate)."""
        env = decode_envelope(data, "cert")
        root = self.root
        role = root.roles["enroll"]
        require_threshold(env, root.keys, root.role_keys("enroll"), role.threshold, "certificate")
        cert = decode_certificate(env.payload)
        if cert.cluster != root.cluster:
            raise SignatureError(f"certificate {cert.node_id} is for cluster {cert.cluster!r}, not {root.cluster!r}")
        return cert

    def verify_certificate(self, data: bytes, now: float) -> Certificate:
        cert = self.check_certificate(data)
        self.check_certificate_now(cert, now)
        return cert

    def check_certificate_now(self, cert: Certificate, now: float) -> None:
        """What of ``verify_certificate`` changes with time and policy, for a certificate whose signature
        and format ``check_certificate`` accepted under the current root: its validity window, revocation."""
        if cert.not_before > now + self.skew_s:
            raise NotYetValidError(f"certificate {cert.node_id} ({cert.cert_id}) is not valid before {cert.not_before}")
        if cert.not_after < now - self.skew_s:
            raise ExpiredError(f"certificate {cert.node_id} ({cert.cert_id}) expired at {cert.not_after}")
        self.check_revoked(cert)

    def check_revoked(self, cert: Certificate) -> None:
        pol = self.policy
        if pol is None:
            return
        if cert.node_id in pol.revocations.nodes:
            raise RevokedError(f"node {cert.node_id} is revoked by policy serial {pol.serial}")
        if cert.cert_id in pol.revocations.certs:
            raise RevokedError(f"certificate {cert.cert_id} of {cert.node_id} is revoked by policy serial {pol.serial}")
