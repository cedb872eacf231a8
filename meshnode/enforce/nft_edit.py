"""A new ruleset as an edit of the one the kernel holds: one nftables transaction that deletes the rules
that left, inserts the ones that came in place, and adds, changes or deletes only the sets that differ.

A full load re-creates the whole table: every set, every rule and the anonymous port sets inside them.
With a 50-rule policy that is about 15 ms of CPU (libnftables parsing the JSON, the kernel building and
releasing the objects), paid by every node at once when a version arrives.  A version usually changes
a few rules; the edit changes only those (~1.5 ms for one rule out of 260, measured in a namespace).

The plan needs the kernel's handle of every rule of the applied ruleset, in order: they come from the
last read-back (``nft -j list table`` prints them) that matched the applied ruleset exactly.  Rules are
compared as :class:`FilterRule` values (sets are compared by name and definition, so equal rules render
to equal nftables rules); the order of the new ruleset is reproduced with ``insert`` before the next rule
that stays (or ``add`` at the end of the chain).  The kernel applies the transaction whole or not at all;
the read-back after it compares the kernel's listing with the new ruleset's hash, as after a full load.

``plan_edit`` returns None when an edit is not worth it or not possible (a set whose definition
changed, more than half of the rules changed): the caller then replaces the table.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any

from .model import AddressSet, Ruleset
from .nft import CHAIN, FAMILY, rule_json, set_json, set_update_json

MAX_CHANGED_SHARE = 0.5  # more changed rules than this share of the new chain: a full load is as cheap


def _definition(s: AddressSet) -> AddressSet:
    """``s`` without its elements: what cannot change in place."""
    return replace(s, elements=(), purpose="")


def plan_edit(old: Ruleset, handles: tuple[int, ...], new: Ruleset) -> dict[str, Any] | None:
    """The transaction (nft JSON) that turns the kernel's ``old`` (rule ``handles`` in chain order) into
    ``new``; None when the table should be replaced instead."""
    if old.table != new.table or len(handles) != len(old.rules):
        return None
    before = {s.name: s for s in old.sets}
    after = {s.name: s for s in new.sets}
    for name in before.keys() & after.keys():
        if _definition(before[name]) != _definition(after[name]):
            return None
    matcher = difflib.SequenceMatcher(None, old.rules, new.rules, autojunk=False)
    ops = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops)
    if changed > MAX_CHANGED_SHARE * max(len(new.rules), 1):
        return None
    t = new.table
    chain = {"family": FAMILY, "table": t, "chain": CHAIN}
    cmds: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
    # sets the new rules refer to exist before those rules are added
    cmds += [{"add": {"set": set_json(t, s)}} for s in new.sets if s.name not in before]
    moved = [(before[s.name], s) for s in new.sets if s.name in before and before[s.name].elements != s.elements]
    cmds += set_update_json(t, moved)["nftables"][1:]
    for _, i1, i2, _, _ in ops:
        cmds += [{"delete": {"rule": {**chain, "handle": h}}} for h in handles[i1:i2]]
    for _, _, i2, j1, j2 in ops:
        # each run of new rules goes in front of the next rule that stays, in order; after the last
        # one that stays, at the end of the chain
        anchor = {"handle": handles[i2]} if i2 < len(handles) else {}
        verb = "insert" if anchor else "add"
        cmds += [{verb: {"rule": {**rule_json(new, r), **anchor}}} for r in new.rules[j1:j2]]
    # sets no rule refers to any more go last
    cmds += [{"delete": {"set": {"family": FAMILY, "table": t, "name": name}}} for name in before if name not in after]
    return {"nftables": cmds}


def rule_handles(listing: dict[str, Any], table: str) -> tuple[int, ...]:
    """The handles of the rules of our chain in a kernel listing (``nft -j list table``), in order."""
    out = []
    for entry in listing.get("nftables", []):
        rule = entry.get("rule") if isinstance(entry, dict) else None
        if (isinstance(rule, dict) and rule.get("table") == table and rule.get("chain") == CHAIN
                and isinstance(rule.get("handle"), int)):
            out.append(rule["handle"])
    return tuple(out)
