"""Enforcement: render the signed policy into this node's host firewall and keep the kernel in sync.

    ruleset = render(policy, own_cert, member_certs, RenderOptions(mesh_port=7946), now=now)
    backend = make_backend("nftables", options)          # or "iptables", or "file" (override only)
    backend.apply(ruleset)                               # EnforcementError keeps the previous ruleset
    backend.check_drift()                                # from the daemon's timer; re-applies on drift

Modules, in dependency order (each imports only those above it):

    model.py             the backend-neutral ruleset: address sets, filter rules, reference semantics
    members.py           which member certificates count, their addresses by family, role and node
    render.py            signed policy + certificates -> this node's Ruleset, step by step
    nft.py               Ruleset -> nftables text / JSON
    nft_digest.py        normalisation of our JSON and the kernel's listing; the ruleset's hash
    iptables.py          Ruleset -> ipset + iptables-restore inputs
    backend.py           what every backend does the same way: apply, set updates, drift, bookkeeping
    nft_edit.py          a new ruleset as an edit of the applied one (changed rules and sets only)
    nft_backend.py       nft -j -f, element and rule edits, kernel readback
    iptables_backend.py  ipset generations and swaps, iptables-restore, the INPUT hook
    file_backend.py      an atomically written file (development; enforces nothing)
    backends.py          which backends exist and building the configured one
"""

from .backend import ApplyResult, Backend, DriftResult, EnforcementEvent
from .backends import make_backend, missing_tools
from .file_backend import FileBackend
from .iptables import to_iptables
from .iptables_backend import IptablesBackend
from .model import AddressSet, EnforcementError, Exclusion, FilterRule, Packet, RenderOptions, Ruleset
from .nft import to_nft_json, to_nft_text
from .nft_backend import NftBackend
from .nft_digest import RulesetDigest, ruleset_digest
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
    "RulesetDigest",
    "make_backend",
    "missing_tools",
    "render",
    "ruleset_digest",
    "to_iptables",
    "to_nft_json",
    "to_nft_text",
]
