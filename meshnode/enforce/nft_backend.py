"""The nftables backend: ``table inet <table>``, replaced atomically with ``nft -j -f -``; sets updated in
place with one element transaction; a few changed rules edited in place with one transaction (see
:mod:`.nft_edit`; needs the rule handles of a read-back that matched the applied ruleset).

With an nft built without JSON support it falls back to the text form (``nft -f -``) and compares the
kernel's text listing with the one read right after applying (no in-place set updates then)."""

from __future__ import annotations

import json
from typing import Any

from .backend import Backend, CommandRunner, Readback, SetChanges, first_lines, sha256_hex
from .libnft import InProcessNft
from .model import EnforcementError, Ruleset
from .nft import FAMILY, set_update_json, to_nft_json, to_nft_text
from .nft_digest import RulesetDigest, listing_hash
from .nft_edit import plan_edit, rule_handles


class NftBackend(Backend):
    name = "nftables"
    # Below this many rules a full load costs less than an edit: libnftables reads the ruleset back to
    # place a rule by handle. Measured alone in a namespace (render + digest + load): 35 rules, full
    # 4.6 ms against edit 9.7; 251 rules, full 27.6 against edit 19.2; and with 12 daemons loading
    # 30-32 rules each at once, full loads kept the mesh faster (tests/bench_netns.py --changing-rules).
    edit_min_rules = 100

    def __init__(self, table: str, *, netns: str | None = None, nft: str = "nft", in_process: bool = True) -> None:
        """``in_process``: in the caller's own namespace run the commands through libnftables when it
        loads (see :mod:`.libnft`), else (or with a ``netns``, or another ``nft`` tool) the ``nft`` tool."""
        super().__init__(table)
        lib = InProcessNft.open() if in_process and netns is None and nft == "nft" else None
        self.runner: CommandRunner | InProcessNft = lib if lib is not None else CommandRunner(netns)
        self.in_process = lib is not None
        self.nft = nft
        self.exact = True  # False if this nft prints our ruleset differently from how we render it
        self.proven_exact = False  # a read-back after a full load matched the rendered ruleset exactly
        self._json: bool | None = None  # probed on first use
        self._doc: tuple[Ruleset, dict[str, Any]] | None = None  # the last ruleset's nft JSON (see _nft_json)
        # (hash, rule handles) of the kernel's last JSON listing; forgotten at every write of ours
        self._listed: tuple[str, tuple[int, ...]] | None = None

    def json_supported(self) -> bool:
        if self._json is None:
            proc = self.runner.run([self.nft, "-j", "list", "tables"], check=False)
            self._json = not (proc.returncode != 0 and b"JSON" in proc.stderr)
        return self._json

    def _nft_json(self, ruleset: Ruleset) -> dict[str, Any]:
        """``to_nft_json(ruleset)``, built once per ruleset (a drift repair loads it again)."""
        if self._doc is None or self._doc[0] is not ruleset:
            self._doc = (ruleset, to_nft_json(ruleset))
        return self._doc[1]

    def _load(self, doc: dict[str, Any]) -> None:
        self._listed = None
        self.runner.run([self.nft, "-j", "-f", "-"], stdin=json.dumps(doc).encode())

    def _list(self, as_json: bool) -> bytes | None:
        argv = [self.nft, *(["-j"] if as_json else []), "list", "table", FAMILY, self.table]
        proc = self.runner.run(argv, check=False)
        if proc.returncode != 0:
            if b"No such file or directory" in proc.stderr:
                return None
            raise EnforcementError(f"nft list table {FAMILY} {self.table} failed: {first_lines(proc.stderr)}")
        return proc.stdout

    def read_kernel(self) -> dict[str, Any] | None:
        """The kernel's JSON listing of our table, or None when the table does not exist."""
        out = self._list(as_json=True)
        return None if out is None else json.loads(out)

    def read_kernel_hash(self) -> str | None:
        if not self.json_supported():
            out = self._list(as_json=False)
            return None if out is None else sha256_hex(out)
        doc = self.read_kernel()
        if doc is None:
            self._listed = None
            return None
        kernel = listing_hash(doc, self.applied)
        self._listed = (kernel, rule_handles(doc, self.table))
        return kernel

    def _in_place_possible(self) -> bool:
        return self.exact

    def _replace(self, ruleset: Ruleset, digest: RulesetDigest) -> Readback:
        if self.json_supported():
            self._load(self._nft_json(ruleset))
        else:
            self._listed = None
            self.runner.run([self.nft, "-f", "-"], stdin=to_nft_text(ruleset, digest.hash).encode())
        kernel = self.read_kernel_hash()
        self.exact = kernel == digest.hash
        self.proven_exact = self.proven_exact or self.exact
        return Readback(kernel, self.exact)

    def _may_read_back_later(self) -> bool:
        """Once this nft proved it lists what we load exactly (the deferred read-back compares the kernel's
        listing with the rendered hash)."""
        return self.exact and self.proven_exact and self.json_supported()

    def _load_only(self, ruleset: Ruleset) -> bool:
        """One ``nft -j -f`` transaction, no read-back (see :meth:`_may_read_back_later`)."""
        if not self._may_read_back_later():
            return False
        self._load(self._nft_json(ruleset))
        return True

    def _edit_rules(self, ruleset: Ruleset, digest: RulesetDigest, read_back_later: bool) -> Readback | None:
        """Only when the kernel's last listing was of the applied ruleset (so its handles are the applied
        rules'), the ruleset is large enough (``edit_min_rules``) and the edit small enough to be worth
        it (:func:`.nft_edit.plan_edit`)."""
        applied, listed = self.applied, self._listed
        if (applied is None or listed is None or self._applied_digest is None
                or listed[0] != self._applied_digest.hash or not self.json_supported()):
            return None
        if len(applied.rules) < self.edit_min_rules:
            return None
        doc = plan_edit(applied, listed[1], ruleset)
        if doc is None:
            return None
        self._load(doc)
        if read_back_later and self._may_read_back_later():
            return Readback(None, True, verified=False)
        kernel = self.read_kernel_hash()
        if kernel != digest.hash:
            raise EnforcementError(f"after the rule edit the kernel holds {kernel}, not {digest.hash}")
        return Readback(kernel)

    def _update_in_place(self, ruleset: Ruleset, digest: RulesetDigest, changes: SetChanges) -> Readback:
        if changes:
            self._load(set_update_json(self.table, changes))
        kernel = self.read_kernel_hash()
        if kernel != digest.hash:
            raise EnforcementError(f"after the set update the kernel holds {kernel}, not {digest.hash}")
        return Readback(kernel)

    def _remove_objects(self) -> None:
        self._listed = None
        self.runner.run([self.nft, "-f", "-"],
                        stdin=f"table {FAMILY} {self.table} {{}}\ndelete table {FAMILY} {self.table}\n".encode())
