"""Test fixtures: the sample policy, parsed and signed.

Deterministic authorities and node identities come from :mod:`simulations.identities` (the simulator
builds its scenarios with them); the sample policy's text from :func:`meshnode.examples.sample_policy_toml`.
"""

from __future__ import annotations

from meshnode.examples import sample_policy_toml
from protocol.trust import DAY_S, Authority, PolicyDocument, Revocations, parse_policy_toml
from simulations.identities import T0


def sample_document() -> tuple[PolicyDocument, Revocations]:
    return parse_policy_toml(sample_policy_toml())


def sign_sample(
    auth: Authority,
    serial: int,
    now: int = T0,
    valid_s: int = 7 * DAY_S,
    document: PolicyDocument | None = None,
    revocations: Revocations | None = None,
) -> bytes:
    """``auth`` signs the sample policy (or ``document``) at ``serial``, valid from ``now`` for ``valid_s``."""
    doc, rev = sample_document()
    return auth.sign_policy(document or doc, serial, now, now + valid_s, revocations or rev)
