"""Which enforcement backends exist, which tools each needs, and building the one the config names."""

from __future__ import annotations

import shutil
from pathlib import Path

from .backend import Backend
from .file_backend import FileBackend
from .iptables_backend import IptablesBackend
from .model import EnforcementError, RenderOptions
from .nft_backend import NftBackend

BACKEND_NAMES = ("nftables", "iptables", "file")
REQUIRED_TOOLS = {
    "nftables": ("nft",),
    "iptables": ("iptables-restore", "ip6tables-restore", "iptables-save", "ipset"),
    "file": (),
}


def make_backend(
    name: str,
    options: RenderOptions,
    *,
    file_path: Path | str | None = None,
    allow_file_backend: bool = False,
    netns: str | None = None,
    file_format: str = "nft",
) -> Backend:
    """``name`` is nftables (default), iptables, or file (only with the override allow_file_backend)."""
    if name in ("nftables", "nft"):
        return NftBackend(options.table, netns=netns)
    if name == "iptables":
        return IptablesBackend(options.table, netns=netns)
    if name == "file":
        if not allow_file_backend:
            raise EnforcementError(
                "the file backend enforces nothing; it is allowed only with the explicit override "
                "[overrides] allow_file_backend = true"
            )
        if file_path is None:
            raise EnforcementError("the file backend needs a file path (enforce.file)")
        return FileBackend(options.table, Path(file_path), file_format)
    raise EnforcementError(f"unknown enforcement backend {name!r}: one of {', '.join(BACKEND_NAMES)}")


def missing_tools(name: str) -> list[str]:
    """The missing executables for a backend (empty when it can run here)."""
    return [t for t in REQUIRED_TOOLS.get(name, ()) if shutil.which(t) is None]
