"""The file backend: writes the rendered ruleset to a file and enforces nothing (only with the override
``allow_file_backend``; for development, tests and hosts whose firewall another tool loads)."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write, remove_stale_temps
from .backend import Backend, Readback, SetChanges, sha256_hex
from .model import EnforcementError, Ruleset
from .nft import to_nft_json, to_nft_text
from .nft_digest import RulesetDigest

FILE_FORMATS = ("nft", "json")


class FileBackend(Backend):
    """Every apply rewrites the whole file atomically; "the kernel" is the file, drift is an edit of it."""

    name = "file"

    def __init__(self, table: str, path: Path, fmt: str = "nft") -> None:
        super().__init__(table)
        if fmt not in FILE_FORMATS:
            raise EnforcementError(f"file backend format {fmt!r}: nft or json")
        self.path = Path(path)
        self.fmt = fmt
        # A write killed mid-way leaves `.<file>.tmp.<pid>`: remove those of our file before writing.
        self.temps_removed = remove_stale_temps(self.path.parent, lambda name: name == self.path.name)

    def _text(self, ruleset: Ruleset, digest: RulesetDigest) -> bytes:
        if self.fmt == "json":
            return (json.dumps(to_nft_json(ruleset), indent=2) + "\n").encode()
        return to_nft_text(ruleset, digest.hash).encode()

    def read_kernel_hash(self) -> str | None:
        try:
            return sha256_hex(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EnforcementError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _in_place_possible(self) -> bool:
        return False  # a file is always rewritten whole

    def _replace(self, ruleset: Ruleset, digest: RulesetDigest) -> Readback:
        data = self._text(ruleset, digest)
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            raise EnforcementError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return Readback(sha256_hex(data))

    def _update_in_place(self, ruleset: Ruleset, digest: RulesetDigest, changes: SetChanges) -> Readback:
        raise EnforcementError("the file backend has no in-place set update")

    def _remove_objects(self) -> None:
        self.path.unlink(missing_ok=True)
