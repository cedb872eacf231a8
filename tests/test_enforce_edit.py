"""A new version as an edit of the ruleset the kernel holds (``meshnode/enforce/nft_edit.py``), and the
ruleset digest computed from remembered per-rule texts (``nft.ruleset_digest``).

The reference for both is the outside one: the kernel's own listing after the edit must hash to the new
ruleset's digest (the same test as after a full load), and the digest must equal normalising the whole
rendered nftables document, as it did before it remembered anything."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshnode.enforce import NftBackend, RenderOptions, Ruleset, render, ruleset_digest, to_nft_json
from meshnode.enforce.nft_digest import listing_hash, normalize, normalized_hash, strip_elements
from meshnode.enforce.nft_edit import plan_edit, rule_handles
from protocol.trust import Certificate, build_policy
from protocol.trust.policy import PolicyDocument, Rule, validate_document
from simulations.identities import T0
from tests.netns import Lab, skip_reason
from tests.test_enforce_property import MESH, PORTS, SOURCES, TARGETS, certificates, documents, options

OPTS = RenderOptions(mesh_port=MESH)


def rendered(doc: PolicyDocument, certs: list[Certificate], opts: RenderOptions = OPTS, serial: int = 1) -> Ruleset:
    pv = build_policy("test", serial, T0, T0 + 86400, 1, doc)
    return render(pv, certs[0], certs[1:], opts, now=T0)


def reference_digest(rs: Ruleset) -> tuple[str, str]:
    norm = normalize(to_nft_json(rs))
    return normalized_hash(norm), normalized_hash(strip_elements(norm))


@settings(max_examples=150, deadline=None)
@given(documents(), certificates(), options)
def test_the_digest_equals_normalising_the_whole_document(doc: PolicyDocument, certs: list[Certificate],
                                                            opts: RenderOptions) -> None:
    rs = rendered(doc, certs, opts)
    first = ruleset_digest(rs)
    assert (first.hash, first.structure_hash) == reference_digest(rs)
    assert ruleset_digest(rs) == first  # from the remembered rule texts


# -- plans (no kernel) ---------------------------------------------------------------------------------
def _rule(i: int, ports: tuple[str, ...] = ("tcp/5432",), sources: tuple[str, ...] = ("role:app",)) -> Rule:
    return Rule(name=f"r{i}", sources=sources, to=("role:*",), ports=ports)


def _doc(*rules: Rule) -> PolicyDocument:
    return validate_document(PolicyDocument(allow=tuple(rules)))


CERTS = [Certificate(cluster="test", node_id=f"n{i}", region="r1", roles=(("app", "db", "web")[i % 3],),
                     addresses=(f"10.0.0.{i + 1}", f"fd00::{i + 1:x}"), identity_key=bytes(32), static_key=bytes(32),
                     not_before=0, not_after=T0 * 2, cert_id=f"cert-n{i}") for i in range(6)]


def test_a_plan_deletes_and_inserts_only_what_changed_in_order() -> None:
    rules = [_rule(i, (f"tcp/{1000 + i}",)) for i in range(8)]
    old = rendered(_doc(*rules), CERTS)
    new = rendered(_doc(*rules[:3], _rule(99, ("tcp/99",)), *rules[4:]), CERTS)
    handles = tuple(range(100, 100 + len(old.rules)))
    plan = plan_edit(old, handles, new)
    assert plan is not None
    cmds = plan["nftables"][1:]
    deletes = [c["delete"]["rule"]["handle"] for c in cmds if "delete" in c and "rule" in c["delete"]]
    inserts = [c for c in cmds if "insert" in c or "add" in c]
    gone = [h for h, r in zip(handles, old.rules, strict=True) if r not in new.rules]
    assert deletes == gone and gone
    came = [r for r in new.rules if r not in old.rules]
    assert len(inserts) == len(came) and all("insert" in c for c in inserts)  # in front of a rule that stays
    # only rules changed: no set is touched
    assert not any("set" in next(iter(c.values())) or "element" in next(iter(c.values())) for c in cmds)


def test_no_plan_when_a_set_definition_or_most_rules_change() -> None:
    base = rendered(_doc(_rule(1), _rule(2, ("tcp/80",))), CERTS)
    handles = tuple(range(len(base.rules)))
    assert plan_edit(base, handles[:-1], base) is None  # handles of another ruleset
    grown = replace(base, sets=tuple(replace(s, interval=not s.interval) for s in base.sets))
    assert plan_edit(base, handles, grown) is None  # a set definition changed
    other = rendered(_doc(*[_rule(i, (f"tcp/{2000 + i}",), ("role:db", "role:web")) for i in range(12)]), CERTS)
    assert plan_edit(base, handles, other) is None  # most rules changed: a full load is as cheap
    same = plan_edit(base, handles, base)
    assert same is not None and same["nftables"][1:] == []


def test_rule_handles_of_our_chain_only() -> None:
    listing = {"nftables": [{"metainfo": {}}, {"chain": {"table": "policymesh", "name": "input", "handle": 1}},
                            {"rule": {"table": "policymesh", "chain": "input", "handle": 4}},
                            {"rule": {"table": "other", "chain": "input", "handle": 5}},
                            {"rule": {"table": "policymesh", "chain": "input", "handle": 7}},
                            {"rule": {"table": "policymesh", "chain": "input", "handle": "x"}}]}
    assert rule_handles(listing, "policymesh") == (4, 7)


# -- against the kernel --------------------------------------------------------------------------------
NFT_SKIP = skip_reason("nft")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if NFT_SKIP:
        pytest.skip(NFT_SKIP)
    lab = Lab(hosts=("e",), bridge=False)
    try:
        lab.up()
    except RuntimeError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        yield lab
    finally:
        lab.down()


@st.composite
def edits(draw: st.DrawFn) -> tuple[PolicyDocument, PolicyDocument]:
    """A policy and the next version: some rules dropped, some added, some changed, the order kept."""
    def rule(i: int) -> Rule:
        return Rule(name=f"r{i}", sources=tuple(draw(st.lists(st.sampled_from(SOURCES), min_size=1, max_size=3, unique=True))),
                    to=tuple(draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2, unique=True))),
                    ports=tuple(draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))))

    old = [rule(i) for i in range(draw(st.integers(2, 8)))]
    new = []
    for i, r in enumerate(old):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "change", "add"]))
        if action == "keep":
            new.append(r)
        elif action == "change":
            new.append(rule(i))  # same name, drawn again
        elif action == "add":
            new += [r, rule(100 + i)]
    if draw(st.booleans()):
        new.append(rule(200))
    return _doc(*old), _doc(*new)


@pytest.mark.root
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=edits(), certs=certificates())
def test_an_edit_leaves_the_kernel_holding_exactly_the_new_ruleset(lab: Lab, pair: tuple[PolicyDocument, PolicyDocument],
                                                                  certs: list[Certificate]) -> None:
    lab.reset_firewall("e")
    be = NftBackend("policymesh", netns=lab.ns["e"])
    be.edit_min_rules = 0  # edits at any size (the default edits only large rulesets)
    old, new = rendered(pair[0], certs), rendered(pair[1], certs, serial=2)
    first = be.apply(old)
    assert first.verified and first.kernel_hash == first.hash
    handles = rule_handles(be.read_kernel() or {}, "policymesh")
    planned = plan_edit(old, handles, new)
    res = be.apply(new)
    event(f"mode {res.mode}")
    assert res.kernel_hash == res.hash == ruleset_digest(new).hash  # read back from the kernel
    assert res.mode == ("sets" if ruleset_digest(old).structure_hash == ruleset_digest(new).structure_hash
                        else "rules" if planned is not None else "full")
    assert not be.check_drift().drifted
    listing = be.read_kernel()
    assert listing is not None  # its hash from remembered rule texts is the hash of normalising it whole
    assert listing_hash(listing, new) == normalized_hash(normalize(listing)) == res.hash
    assert listing_hash(listing, old) == res.hash  # rules of another ruleset: normalised whole


@pytest.mark.root
@pytest.mark.skipif(NFT_SKIP is not None, reason=NFT_SKIP or "")
def test_edits_in_a_row_with_deferred_read_back_and_a_rule_removed_behind_our_back(lab: Lab) -> None:
    lab.reset_firewall("e")
    be = NftBackend("policymesh", netns=lab.ns["e"])
    be.edit_min_rules = 0  # edits at any size (the default edits only large rulesets)
    versions = [rendered(_doc(*[_rule(i, (f"tcp/{1000 + i + k}",) if i == k else (f"tcp/{1000 + i}",))
                                for i in range(10)]), CERTS, serial=k + 1) for k in range(4)]
    assert be.apply(versions[0]).mode == "full"  # read back at once: nft lists our rulesets exactly
    res = be.apply(versions[1], read_back_later=True)
    assert res.mode == "rules" and not res.verified
    # before the read-back the handles of the new rules are unknown: the next version replaces everything
    assert be.apply(versions[2], read_back_later=True).mode == "full"
    assert not be.check_drift().drifted  # the read-back learns the handles again
    res = be.apply(versions[3], read_back_later=True)
    assert res.mode == "rules"
    assert not be.check_drift().drifted
    # another tool deletes one of our rules: the edit that would delete it fails, the table is replaced
    doc = be.read_kernel()
    assert doc is not None
    victim = [e["rule"] for e in doc["nftables"] if "rule" in e and e["rule"].get("comment") == "allow r3"][0]
    lab.exec("e", ["nft", "delete", "rule", "inet", "policymesh", "input", "handle", str(victim["handle"])])
    tampered = be.read_kernel()
    assert tampered is not None and listing_hash(tampered, versions[3]) == normalized_hash(normalize(tampered)) != res.hash
    res = be.apply(versions[0])
    assert res.mode == "full" and res.kernel_hash == ruleset_digest(versions[0]).hash
    # by default a ruleset this small is loaded whole (cheaper than an edit below edit_min_rules)
    small = NftBackend("policymesh", netns=lab.ns["e"])
    assert small.apply(versions[1]).mode == "full" and small.apply(versions[2]).mode == "full"
    assert len(versions[2].rules) < small.edit_min_rules
