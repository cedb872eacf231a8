"""Which member certificates a render counts, and their addresses by family, role and node.

Defence in depth: a certificate revoked by the policy (node id or cert id), of another cluster, or (when
``now`` is given) outside its validity contributes no address; nor does an address that cannot go into a
set (scoped link-local, unparsable).  Each is listed as an :class:`Exclusion` with its reason.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from protocol.trust import Certificate
from protocol.trust.policy import Revocations

from .model import Exclusion


class MemberAddresses:
    """Addresses of the valid, unrevoked members, by family, role and node (lists; deduplicated when a
    set is built).  This is the hot loop of a 10,000-member render: inet_pton/inet_ntop inline, and
    no per-address tuples (they would only feed the garbage collector)."""

    def __init__(self) -> None:
        self.all: dict[str, list[str]] = {"ip": [], "ip6": []}
        self.by_role: dict[str, dict[str, list[str]]] = {"ip": {}, "ip6": {}}
        self.by_node: dict[str, dict[str, list[str]]] = {"ip": {}, "ip6": {}}
        self.sort_key: dict[str, bytes] = {}

    def add(self, cert: Certificate) -> list[str]:
        bad = []
        pton, ntop, sort_key = socket.inet_pton, socket.inet_ntop, self.sort_key
        for raw in cert.addresses:
            if "%" in raw:  # scoped link-local: cannot go into a set
                bad.append(raw)
                continue
            if ":" in raw:
                af, fam = socket.AF_INET6, "ip6"
            else:
                af, fam = socket.AF_INET, "ip"
            try:
                packed = pton(af, raw)
            except OSError:
                bad.append(raw)
                continue
            text = ntop(af, packed)
            sort_key[text] = packed
            self.all[fam].append(text)
            by_role = self.by_role[fam]
            for role in cert.roles:
                if role in by_role:
                    by_role[role].append(text)
                else:
                    by_role[role] = [text]
            self.by_node[fam].setdefault(cert.node_id, []).append(text)
        return bad


def exclusion_reason(cert: Certificate, own: Certificate, revoked_nodes: frozenset[str],
                     revoked_certs: frozenset[str], now: float | None, skew_s: float) -> str | None:
    if cert.cluster != own.cluster:
        return f"cluster {cert.cluster!r} is not {own.cluster!r}"
    if cert.node_id in revoked_nodes:
        return "node revoked"
    if cert.cert_id in revoked_certs:
        return "certificate revoked"
    if now is not None:
        if cert.not_after < now - skew_s:
            return "certificate expired"
        if cert.not_before > now + skew_s:
            return "certificate not yet valid"
    return None


def admit_members(own: Certificate, members: Iterable[Certificate], rev: Revocations, *, now: float | None,
                  skew_s: float) -> tuple[MemberAddresses, list[Exclusion]]:
    """The addresses of this node and its valid members (each certificate once), and the certificates or
    addresses left out, with why."""
    addresses = MemberAddresses()
    excluded: list[Exclusion] = []
    seen: set[str] = set()
    revoked_nodes, revoked_certs = frozenset(rev.nodes), frozenset(rev.certs)
    for cert in [own, *members]:
        key = f"{cert.node_id}\0{cert.cert_id}"
        if key in seen:
            continue
        seen.add(key)
        reason = exclusion_reason(cert, own, revoked_nodes, revoked_certs, now, skew_s)
        if reason is not None:
            excluded.append(Exclusion(cert.node_id, cert.cert_id, reason))
            continue
        for bad in addresses.add(cert):
            excluded.append(Exclusion(cert.node_id, cert.cert_id, f"address {bad!r} skipped"))
    return addresses, excluded
