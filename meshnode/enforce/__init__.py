"""Enforcement: render the signed policy into this node's host firewall and keep the kernel in sync.

    ruleset = render(policy, own_cert, member_certs, RenderOptions(mesh_port=7946), now=now)
    backend = make_backend("nftables", options)          # or "iptables", or "file" (override only)
    backend.apply(ruleset)                               # EnforcementError keeps the previous ruleset
    backend.check_drift()                                # from the daemon's timer; re-applies on drift
"""

from .backends import (
    ApplyResult,
    Backend,
    DriftResult,
    EnforcementEvent,
    FileBackend,
    IptablesBackend,
    NftBackend,
    make_backend,
    missing_tools,
)
from .model import AddressSet, EnforcementError, Exclusion, FilterRule, Packet, RenderOptions, Ruleset
from .render import render

__all__ = [
    "AddressSet",
    "ApplyResult",
    "Backend",
    "DriftResult",
    "EnforcementError",
    "EnforcementEvent",
    "Exclusion",
    "FileBackend",
    "FilterRule",
    "IptablesBackend",
    "NftBackend",
    "Packet",
    "RenderOptions",
    "Ruleset",
    "make_backend",
    "missing_tools",
    "render",
]
