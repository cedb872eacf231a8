"""``meshnode render``: verify the inputs with the node's trust state and print what it would apply.

``meshnode render`` (``meshnode/cli/meshnode.py``) reads the files named on the command line and the
node config, builds the :class:`TrustedState` and :class:`RenderOptions`, and calls :func:`render_command`.
"""

from __future__ import annotations

import json

from protocol.errors import ExpiredError, NotYetValidError, TrustError
from protocol.trust import Certificate, PolicyVersion, TrustedState

from ..enforce import EnforcementError, RenderOptions, render, to_iptables, to_nft_json, to_nft_text

FORMATS = ("nft", "json", "iptables")


def render_command(
    *,
    policy_bytes: bytes | None,
    own_cert_bytes: bytes,
    peer_cert_bytes: list[bytes],
    trust: TrustedState,
    now: float,
    options: RenderOptions,
    fmt: str,
) -> str:
    """Return the ruleset text (``nft``: nftables syntax for ``nft -f``; ``json``: nft JSON for
    ``nft -j -f``).

    * ``policy_bytes`` (a signed policy envelope) is checked with ``trust.check_policy`` (signatures,
      root, rollback, expiry as new input); without it the trust state's current policy is used, even if
      it has expired since it was accepted (fail-static), and with no policy at all the output still
      drops by default and keeps loopback and the mesh interlock.
    * ``own_cert_bytes`` must verify and be within its validity; a policy that revokes this node is
      refused (RevokedError).
    * every peer certificate must carry valid enroll signatures for this cluster (else TrustError);
      expired, not-yet-valid or revoked peers are left out of every set and listed as comments.

    Raises TrustError for unverifiable input and EnforcementError for an unknown format; never
    returns an allow-all ruleset.
    """
    if fmt not in FORMATS:
        raise EnforcementError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    policy: PolicyVersion | None
    if policy_bytes is not None:
        policy = trust.check_policy(policy_bytes, now).policy
    else:
        policy = trust.policy
    own = trust.check_certificate(own_cert_bytes)
    _check_validity(own, trust, now)
    peers = []
    for i, data in enumerate(peer_cert_bytes):
        try:
            peers.append(trust.check_certificate(data))
        except TrustError as exc:
            raise type(exc)(f"peer certificate #{i + 1}: {exc}") from None
    ruleset = render(policy, own, peers, options, now=now, skew_s=trust.skew_s)
    if fmt == "json":
        return json.dumps(to_nft_json(ruleset), indent=2) + "\n"
    if fmt == "iptables":
        return to_iptables(ruleset).text()
    return to_nft_text(ruleset)


def _check_validity(cert: Certificate, trust: TrustedState, now: float) -> None:
    if cert.not_before > now + trust.skew_s:
        raise NotYetValidError(f"this node's certificate ({cert.node_id}, {cert.cert_id}) is not valid before "
                               f"{cert.not_before}")
    if cert.not_after < now - trust.skew_s:
        raise ExpiredError(f"this node's certificate ({cert.node_id}, {cert.cert_id}) expired at {cert.not_after}")
