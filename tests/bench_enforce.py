"""Enforcement benchmark: 200 rules over 10,000 member certificates in 20 roles.

    .venv/bin/python tests/bench_enforce.py [--nodes 10000] [--rules 200] [--roles 20] [--naive-full]

Prints render time (goal <= 100 ms), nft apply time in a throwaway network namespace (goal <= 500 ms,
root only), the in-place set update, the drift check, and the rule count compared with a naive
one-rule-per-address rendering of the same policy (ours must not grow with the node count).
Certificates are built directly as Certificate structs: signing 10,000 of them is not what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.enforce import (  # noqa: E402
    IptablesBackend,
    NftBackend,
    RenderOptions,
    Ruleset,
    render,
    ruleset_digest,
    to_iptables,
    to_nft_json,
    to_nft_text,
)
from meshnode.enforce.nft import set_update_json  # noqa: E402
from meshnode.enforce.nft_digest import normalize, normalized_hash  # noqa: E402
from meshnode.enforce.render import _port_groups, _targets_me  # noqa: E402
from protocol.trust import (  # noqa: E402  # noqa: E402
    Certificate,
    PolicyDocument,
    PolicyVersion,
    Rule,
    build_policy,  # noqa: E402
    validate_document,
)
from simulations.drill.netfaults import in_netns  # noqa: E402
from simulations.identities import T0  # noqa: E402
from tests.netns import Lab, skip_reason  # noqa: E402

MESH = 7946


def members(n: int, roles: int) -> list[Certificate]:
    out = []
    for i in range(n):
        addrs = (f"10.{i // 65536 + 100}.{(i // 256) % 256}.{i % 256}",)
        if i % 2 == 0:
            addrs += (f"fd10::{i:x}",)
        out.append(Certificate(cluster="bench", node_id=f"n{i:05d}", region=f"r{i % 4}",
                               roles=(f"role{i % roles:02d}",), addresses=addrs, identity_key=bytes(32),
                               static_key=bytes(32), not_before=0, not_after=T0 * 2, cert_id=f"c{i:05d}"))
    return out


def policy(rules: int, roles: int) -> PolicyVersion:
    allow = []
    for i in range(rules):
        ports = [f"tcp/{10000 + i}"] + ([f"udp/{20000 + i}"] if i % 5 == 0 else []) + \
            ([f"tcp/{30000 + 10 * i}-{30000 + 10 * i + 5}"] if i % 3 == 0 else [])
        allow.append(Rule(name=f"rule-{i:03d}", sources=(f"role:role{i % roles:02d}", f"role:role{(7 * i + 3) % roles:02d}"),
                          to=("role:*",), ports=tuple(ports)))
    doc = validate_document(PolicyDocument(allow=tuple(allow)))
    return build_policy("bench", 1, T0, T0 + 86400, 1, doc)


def naive_nft(pv: PolicyVersion, own: Certificate, certs: list[Certificate], table: str) -> tuple[str, int]:
    """The same policy with one rule per (rule, source address, protocol) and no sets."""
    by_role: dict[str, list[str]] = {}
    for c in certs:
        for r in c.roles:
            by_role.setdefault(r, []).extend(c.addresses)
    lines = [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{", "chain input {",
             "type filter hook input priority filter; policy drop;", "ct state established,related accept",
             'iif "lo" accept']
    every = [a for c in certs for a in c.addresses]
    for a in every:
        fam = "ip6" if ":" in a else "ip"
        lines.append(f"{fam} saddr {a} tcp dport {MESH} accept")
    for rule in pv.document.allow:
        if not _targets_me(rule, own):
            continue
        groups = _port_groups(rule)
        for sel in rule.sources:
            for a in by_role.get(sel.split(":", 1)[1], []):
                fam = "ip6" if ":" in a else "ip"
                for proto, ranges in groups:
                    ports = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
                    lines.append(f"{fam} saddr {a} {proto} dport {{ {ports} }} accept")
    rules = len(lines) - 5
    lines += ["drop", "}", "}", ""]
    return "\n".join(lines), rules


def timed(fn, repeat: int = 5) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), result


def edit_vs_full(pv: PolicyVersion, own: Certificate, certs: list[Certificate], opts: RenderOptions,
                 rules: int, roles: int) -> tuple[float, float]:
    """Median ms of applying the next version (one rule more) as a full load and as an edit, in-process,
    each from the same read-back state (the backend's apply() path, deferred read-back as the daemon)."""
    nxt = policy(rules + 1, roles)
    full: list[float] = []
    edit: list[float] = []
    for _ in range(5):
        for as_edit, out in ((False, full), (True, edit)):
            be = NftBackend(opts.table)
            be.edit_min_rules = 0  # measure the edit at any size
            be.apply(render(pv, own, certs, opts, now=T0))  # read back: handles known
            if not as_edit:
                be._listed = None  # forget the handles: the full-load path
            t = time.perf_counter()
            res = be.apply(render(nxt, own, certs, opts, now=T0), read_back_later=True)
            out.append((time.perf_counter() - t) * 1000)
            assert res.mode == ("rules" if as_edit else "full"), res.mode
            assert not be.check_drift().drifted
    return statistics.median(full), statistics.median(edit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--roles", type=int, default=20)
    ap.add_argument("--naive-full", action="store_true",
                    help="also load the naive rendering at full size (375k rules: minutes of kernel time)")
    ap.add_argument("--naive-timeout", type=float, default=120.0)
    args = ap.parse_args()
    opts = RenderOptions(mesh_port=MESH)
    certs = members(args.nodes, args.roles)
    own = Certificate(**{**{f: getattr(certs[0], f) for f in certs[0].__struct_fields__}, "node_id": "self",
                         "cert_id": "self", "roles": tuple(f"role{i:02d}" for i in range(args.roles))})
    pv = policy(args.rules, args.roles)
    print(f"policy: {args.rules} rules, {args.nodes} member certificates, {args.roles} roles")

    render_ms, rs = timed(lambda: render(pv, own, certs, opts, now=T0))
    assert isinstance(rs, Ruleset)
    hash_ms, _ = timed(lambda: normalized_hash(normalize(to_nft_json(rs))))
    digest = ruleset_digest(rs)  # computed once per apply (and passed to the text form)
    text_ms, text = timed(lambda: to_nft_text(rs, digest.hash), repeat=3)
    json_ms, doc = timed(lambda: json.dumps(to_nft_json(rs)), repeat=3)
    print(f"render:            {render_ms:8.1f} ms   (goal <= 100 ms)   {rs.rule_count} rules, {len(rs.sets)} sets, "
          f"{rs.element_count} set elements")
    print(f"normalized hash:   {hash_ms:8.1f} ms")
    print(f"to_nft_text():     {text_ms:8.1f} ms   {len(str(text)) / 1e6:.2f} MB")
    print(f"to_nft_json():     {json_ms:8.1f} ms   {len(str(doc)) / 1e6:.2f} MB")

    tenth = max(1, args.nodes // 10)
    small = render(pv, own, certs[:tenth], opts)
    naive_text, naive_rules = naive_nft(pv, own, certs, opts.table)
    naive_small_text, naive_small = naive_nft(pv, own, certs[:tenth], opts.table)
    print(f"rule count:        sets {small.rule_count} at {args.nodes // 10} nodes -> {rs.rule_count} at {args.nodes} "
          f"nodes;  naive {naive_small} -> {naive_rules}")

    reason = skip_reason("nft")
    if reason:
        print(f"nft apply:         skipped ({reason})")
        return 0
    lab = Lab(hosts=("bench",), bridge=False)
    lab.up()
    try:
        ns = lab.ns["bench"]
        be = NftBackend(opts.table, netns=ns)
        load_ms = []
        for _ in range(3):
            t = time.perf_counter()
            be._load(to_nft_json(rs))
            load_ms.append((time.perf_counter() - t) * 1000)
        text_load = []
        for _ in range(3):
            t = time.perf_counter()
            lab.exec("bench", ["nft", "-f", "-"], stdin=str(text).encode())
            text_load.append((time.perf_counter() - t) * 1000)
        be.json_supported()  # probed once per backend, not part of an apply
        apply_ms, res = timed(lambda: be._replace_all(rs, digest), repeat=3)  # the full-replace path of apply()
        assert getattr(res, "exact", False), "kernel readback differs from the rendered ruleset"
        drift_ms, drift = timed(lambda: be.check_drift(), repeat=3)
        changed = render(pv, own, certs[1:] + [certs[0]], opts)  # same members, another order: no change
        moved = render(pv, own, certs[:-1], opts, now=T0)  # one member gone: sets change in place
        delta = [(a, b) for a, b in zip(rs.sets, moved.sets, strict=True) if a.elements != b.elements]
        t = time.perf_counter()
        be._load(set_update_json(opts.table, delta))
        delta_ms = (time.perf_counter() - t) * 1000
        be._load(set_update_json(opts.table, [(b, a) for a, b in delta]))  # back to rs
        t = time.perf_counter()
        upd = be.apply(moved)
        update_ms = (time.perf_counter() - t) * 1000
        assert upd.mode == "sets"
        assert ruleset_digest(changed).hash == digest.hash and upd.mode == "sets"
        print(f"nft -j -f load:    {statistics.median(load_ms):8.1f} ms   (goal <= 500 ms; JSON, in a namespace)")
        print(f"nft -f load:       {statistics.median(text_load):8.1f} ms   (text)")
        print(f"apply() full:      {apply_ms:8.1f} ms   (load + read back + verify hash)")
        print(f"set delta load:    {delta_ms:8.1f} ms   (one member left: {len(delta)} sets changed in place, nft only)")
        print(f"apply() set path:  {update_ms:8.1f} ms   ({upd.mode}: delta + read back + verify hash)")
        print(f"check_drift():     {drift_ms:8.1f} ms   (drifted={getattr(drift, 'drifted', None)})")
        full_ms, edit_ms = in_netns(ns, lambda: edit_vs_full(pv, own, certs, opts, args.rules, args.roles))
        print(f"next version, full:{full_ms:8.1f} ms   (one rule added: render + digest + full load, libnftables in-process)")
        print(f"next version, edit:{edit_ms:8.1f} ms   (the same version as an edit of the rules that changed; "
              f"ratio {edit_ms / full_ms:.2f})")
        if not skip_reason("iptables-restore", "ipset"):
            lab.reset_firewall("bench")
            ipt = IptablesBackend(opts.table, netns=ns)
            t = time.perf_counter()
            ipt.apply(rs)
            ipt_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            ipt_upd = ipt.apply(moved)
            ipt_upd_ms = (time.perf_counter() - t) * 1000
            rules4 = to_iptables(rs).ipv4.count("\n-A ")
            print(f"iptables apply:    {ipt_ms:8.1f} ms   (ipset restore + iptables/ip6tables-restore + read back; "
                  f"{rules4} IPv4 rules)")
            print(f"iptables sets:     {ipt_upd_ms:8.1f} ms   ({ipt_upd.mode}: ipset swap of {len(ipt_upd.changed_sets)} sets)")
            lab.reset_firewall("bench")
        runs = [(tenth, naive_small, naive_small_text)]
        if args.naive_full:
            runs.append((args.nodes, naive_rules, naive_text))
        for nodes, count, naive in runs:
            t = time.perf_counter()
            try:
                proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=naive.encode(),
                                      capture_output=True, timeout=args.naive_timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"naive nft -f load: > {args.naive_timeout * 1000:.0f} ms at {nodes} nodes ({count} rules, timed out)")
                continue
            naive_ms = (time.perf_counter() - t) * 1000
            status = "ok" if proc.returncode == 0 else f"failed: {proc.stderr.decode()[:200]}"
            print(f"naive nft -f load: {naive_ms:8.1f} ms   at {nodes} nodes ({count} rules, {status})")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTEST_CURRENT_TEST"):
        raise SystemExit("run as a script, not under pytest")
    raise SystemExit(main())
