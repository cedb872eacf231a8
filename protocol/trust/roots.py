"""RootChain: the roots a node trusts, from its pinned anchor to the current root (TUF root rotation).

Takes bytes only; time (wall-clock seconds) is a parameter.  The rules:

* The trust anchor (root N, pinned out of band) must be signed by a threshold of its own root keys.
* Root N+1 needs a threshold of root N's root keys AND of its own, and the same cluster; versions step
  by exactly one.  A duplicate of a trusted root is no change; an older one is a rollback; the same
  version with other content, validly signed by the trusted root keys, is an equivocation.
* Expiry is checked on the final root only (``check_fresh``), so an offline node catches up through
  any number of expired intermediate roots.

``TrustedState`` (``protocol.trust.state``) holds one and adds what a new root means for policies.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import EquivocationError, ExpiredError, RollbackError, RootMismatchError, SignatureError
from protocol.trust.metadata import Root, decode_root
from protocol.trust.signing import decode_envelope, require_threshold

__all__ = ["RootChain"]


class RootChain:
    """The verified roots with their exact signed bytes, oldest (the anchor) first."""

    def __init__(self, anchor: bytes, verified: dict[tuple[bytes, bytes], Any] | None = None) -> None:
        """``verified``: see ``TrustedState``; the anchor's self-signature check is shared through it."""
        hit = verified.get((anchor, b"anchor")) if verified is not None else None
        if hit is not None:
            env, root = hit
        else:
            env = decode_envelope(anchor, "root")
            root = decode_root(env.payload)
            require_threshold(env, root.keys, root.role_keys("root"), root.roles["root"].threshold,
                              f"root v{root.version} (trust anchor) self-signature")
            if verified is not None:
                verified[(anchor, b"anchor")] = (env, root)
        self._roots: list[tuple[Root, bytes]] = [(root, bytes(anchor))]

    @property
    def root(self) -> Root:
        """The current (newest) trusted root."""
        return self._roots[-1][0]

    @property
    def root_envelope(self) -> bytes:
        """The current root's exact signed bytes."""
        return self._roots[-1][1]

    def envelopes(self) -> list[bytes]:
        """Exact signed bytes of every trusted root, oldest first (the anchor included)."""
        return [b for _, b in self._roots]

    def envelope(self, version: int) -> bytes | None:
        """The exact signed bytes of trusted root ``version``, or None if it is not in the chain."""
        first = self._roots[0][0].version
        idx = version - first
        if 0 <= idx < len(self._roots):
            return self._roots[idx][1]
        return None

    def add(self, data: bytes) -> bool:
        """Trust root N+1. Returns False for a duplicate of a trusted root; raises TrustError otherwise."""
        env = decode_envelope(data, "root")
        new = decode_root(env.payload)
        cur = self.root
        if new.version <= cur.version:
            known = self.envelope(new.version)
            if known is not None and decode_envelope(known, "root").payload == env.payload:
                return False
            if new.version < cur.version:
                raise RollbackError(f"root v{new.version} is older than the trusted root v{cur.version}")
            # Same version, other content: equivocation only if it carries valid root signatures.
            require_threshold(env, cur.keys, cur.role_keys("root"), cur.roles["root"].threshold,
                              f"root v{new.version}")
            raise EquivocationError(
                f"root v{new.version} differs from the trusted root v{new.version}: the root keys are compromised"
            )
        if new.version != cur.version + 1:
            raise RootMismatchError(
                f"root v{new.version} cannot follow trusted root v{cur.version}: roots step by one",
                needed_version=cur.version + 1,
            )
        if new.cluster != cur.cluster:
            raise SignatureError(f"root v{new.version} is for cluster {new.cluster!r}, not {cur.cluster!r}")
        require_threshold(env, cur.keys, cur.role_keys("root"), cur.roles["root"].threshold,
                          f"root v{new.version} signed by the keys of root v{cur.version}")
        require_threshold(env, new.keys, new.role_keys("root"), new.roles["root"].threshold,
                          f"root v{new.version} signed by its own root keys")
        self._roots.append((new, bytes(data)))
        return True

    def check_fresh(self, now: float, skew_s: int) -> None:
        """Raise ExpiredError if the current root expired more than ``skew_s`` seconds before ``now``."""
        root = self.root
        if root.expires < now - skew_s:
            raise ExpiredError(
                f"trusted root v{root.version} expired at {root.expires} (unix); "
                "new input is refused until a newer root arrives"
            )
