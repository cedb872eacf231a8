"""The iptables backend: ipsets + ``<table>-input`` chains (IPv4 and IPv6) hooked from INPUT by one jump
each (the layout is described in :mod:`.iptables`).

A full apply loads the next generation of ipsets, switches the chains to it, then destroys the old
generation, so a failed apply leaves the old sets and rules in place.  Set elements change in place by
filling a temporary set and swapping it with the live one (atomic per set)."""

from __future__ import annotations

import json
import re
from typing import Any

from .backend import Backend, CommandRunner, Readback, SetChanges, sha256_hex
from .iptables import (
    chain_name,
    ipset_elements,
    ipset_fill,
    ipset_names,
    ipset_prefix,
    restore_text,
    to_iptables,
)
from .model import EnforcementError, Ruleset
from .nft_digest import RulesetDigest, canonical_element

_MATCH_SET_RE = re.compile(r"--match-set (\S+) ")


class IptablesBackend(Backend):
    name = "iptables"

    def __init__(self, table: str, *, netns: str | None = None, iptables: str = "iptables", ipset: str = "ipset") -> None:
        super().__init__(table)
        self.runner = CommandRunner(netns)
        self.chain = chain_name(table)
        self.tools = {
            "ip": iptables,
            "ip6": iptables.replace("iptables", "ip6tables"),
        }
        self.ipset = ipset
        self.generation: str | None = None

    # -- reading --------------------------------------------------------------------------------------
    def _save(self, fam: str) -> list[str]:
        proc = self.runner.run([f"{self.tools[fam]}-save", "-t", "filter"])
        return proc.stdout.decode().splitlines()

    def _chain_state(self, fam: str) -> dict[str, Any]:
        lines = self._save(fam)
        declared = any(line.startswith(f":{self.chain} ") for line in lines)
        rules = [line for line in lines if line.startswith(f"-A {self.chain} ")]
        input_rules = [line for line in lines if line.startswith("-A INPUT ")]
        jumps = [i for i, line in enumerate(input_rules) if line == f"-A INPUT -j {self.chain}"]
        return {"declared": declared, "rules": rules, "hooked_first": jumps == [0]}

    def _our_sets(self) -> dict[str, dict[str, Any]]:
        proc = self.runner.run([self.ipset, "save"])
        sets: dict[str, dict[str, Any]] = {}
        prefix = f"{self.table}-"
        for line in proc.stdout.decode().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "create" and parts[1].startswith(prefix):
                sets[parts[1]] = {"type": parts[2], "family": parts[parts.index("family") + 1], "elem": []}
            elif len(parts) >= 3 and parts[0] == "add" and parts[1] in sets:
                sets[parts[1]]["elem"].append(parts[2])
        for s in sets.values():
            s["elem"].sort()
        return sets

    def read_kernel_state(self) -> dict[str, Any]:
        return {"ip": self._chain_state("ip"), "ip6": self._chain_state("ip6"), "sets": self._our_sets()}

    def read_kernel_hash(self) -> str | None:
        return self._state_hash(self.read_kernel_state())

    @staticmethod
    def _state_hash(state: dict[str, Any]) -> str | None:
        if not state["ip"]["declared"] and not state["ip6"]["declared"]:
            return None
        return sha256_hex(json.dumps(state, sort_keys=True).encode())

    def _current_generation(self) -> str | None:
        if self.generation is not None:
            return self.generation
        for line in self._save("ip"):
            if line.startswith(f"-A {self.chain} "):
                m = _MATCH_SET_RE.search(line)
                if m and m.group(1).startswith(f"{self.table}-"):
                    return m.group(1)[len(self.table) + 1]
        return None

    @staticmethod
    def _sets_exact(rs: Ruleset, generation: str, kernel_sets: dict[str, dict[str, Any]]) -> bool:
        """The kernel's ipsets hold exactly the rendered elements."""
        for logical, name in ipset_names(rs, generation).items():
            want = {canonical_element(e) for e in ipset_elements(rs.set_by_name(logical))}
            got = {canonical_element(e) for e in kernel_sets.get(name, {}).get("elem", [])}
            if want != got:
                return False
        return True

    # -- writing --------------------------------------------------------------------------------------
    def _destroy_sets(self, names: list[str]) -> None:
        for name in names:
            self.runner.run([self.ipset, "destroy", name], check=False)

    def _hook(self, fam: str) -> None:
        tool = self.tools[fam]
        proc = self.runner.run([tool, "-S", "INPUT"])
        rules = [line for line in proc.stdout.decode().splitlines() if line.startswith("-A INPUT")]
        jump = f"-A INPUT -j {self.chain}"
        positions = [i + 1 for i, line in enumerate(rules) if line == jump]
        if positions == [1]:
            return
        self.runner.run([tool, "-I", "INPUT", "1", "-j", self.chain])
        for pos in sorted((p + 1 for p in positions), reverse=True):  # old ones moved down by one
            self.runner.run([tool, "-D", "INPUT", str(pos)])

    def _restore_chain(self, fam: str, text: str, check: bool = True) -> None:
        self.runner.run([f"{self.tools[fam]}-restore", "--noflush"], stdin=text.encode(), check=check)

    def _delete_chain(self, fam: str) -> None:
        self.runner.run([self.tools[fam], "-F", self.chain], check=False)
        self.runner.run([self.tools[fam], "-X", self.chain], check=False)

    def _rollback_v4(self, previous: dict[str, Any]) -> None:
        if previous["declared"]:
            self._restore_chain("ip", restore_text(self.chain, previous["rules"]), check=False)
        else:
            self._delete_chain("ip")

    def _in_place_possible(self) -> bool:
        return self.generation is not None

    def _replace(self, ruleset: Ruleset, digest: RulesetDigest) -> Readback:
        old = self._current_generation()
        new = "b" if old == "a" else "a"
        rendering = to_iptables(ruleset, new)
        leftovers = [n for n in self._our_sets() if n.startswith(ipset_prefix(self.table, new))]
        self._destroy_sets(leftovers)
        created = list(rendering.set_names.values())
        try:
            self.runner.run([self.ipset, "restore"], stdin=rendering.ipset.encode())
        except EnforcementError:
            self._destroy_sets(created)
            raise
        previous_v4 = self._chain_state("ip")
        try:
            self._restore_chain("ip", rendering.ipv4)
        except EnforcementError:
            self._destroy_sets(created)
            raise
        try:
            self._restore_chain("ip6", rendering.ipv6)
        except EnforcementError:
            self._rollback_v4(previous_v4)
            self._destroy_sets(created)
            raise
        self._hook("ip")
        self._hook("ip6")
        if old is not None:
            self._destroy_sets([n for n in self._our_sets() if n.startswith(ipset_prefix(self.table, old))])
        self.generation = new
        state = self.read_kernel_state()
        return Readback(self._state_hash(state), self._sets_exact(ruleset, new, state["sets"]))

    def _update_in_place(self, ruleset: Ruleset, digest: RulesetDigest, changes: SetChanges) -> Readback:
        assert self.generation is not None
        if self.read_kernel_hash() != self._baseline:
            raise EnforcementError("the chain or sets were edited behind our back")
        rendering = to_iptables(ruleset, self.generation)
        lines: list[str] = []
        tmp_names = []
        for _, s in changes:
            name = rendering.set_names[s.name]
            tmp = f"{name}-t"  # at most 29 characters: ipset allows 31
            tmp_names.append(tmp)
            lines += ipset_fill(tmp, s)
            lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
        if lines:
            try:
                self.runner.run([self.ipset, "restore"], stdin=("\n".join(lines) + "\n").encode())
            except EnforcementError:
                self._destroy_sets(tmp_names)  # swaps are atomic per set; the rest stays as it was
                raise
        state = self.read_kernel_state()
        if not self._sets_exact(ruleset, self.generation, state["sets"]):
            raise EnforcementError("after the set update the kernel's sets differ from the rendered ones")
        return Readback(self._state_hash(state))

    def _remove_objects(self) -> None:
        for fam, tool in self.tools.items():
            state = self._chain_state(fam)
            while True:
                if self.runner.run([tool, "-D", "INPUT", "-j", self.chain], check=False).returncode != 0:
                    break
            if state["declared"]:
                self._delete_chain(fam)
        self._destroy_sets(list(self._our_sets()))
        self.generation = None
