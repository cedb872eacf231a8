"""The old flat module paths of ``protocol`` (before trust/, channel/, gossip/), still importable.

``import protocol.noise`` gives a module that forwards every attribute to ``protocol.channel.noise``:
the objects are the same (``isinstance`` and ``except`` work), only the path is old.  ``protocol.trust``
and ``protocol.channel`` need no entry: the packages of those names export what the modules did.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from collections.abc import Sequence

MOVED: dict[str, str] = {
    **{f"protocol.{m}": f"protocol.trust.{m}" for m in ("authority", "metadata", "names", "policy", "signing")},
    **{f"protocol.{m}": f"protocol.channel.{m}" for m in ("noise", "noise_cipher", "noise_errors", "rate_limit")},
    "protocol.channel_errors": "protocol.channel.errors",
    "protocol.channel_identity": "protocol.channel.identity",
    "protocol.gossip_config": "protocol.gossip.config",
    "protocol.gossip_events": "protocol.gossip.events",
    "protocol.gossip_wire": "protocol.gossip.wire",
    **{
        f"protocol.{m}": f"protocol.gossip.{m}"
        for m in (
            "acceptance", "antientropy", "broadcasts", "conduct", "connected_peers", "directory",
            "dissemination", "enforcement_status", "member_records", "member_table", "members",
            "membership", "node", "offences", "own_record", "peer_selection", "status_view", "swim",
            "version_claims",
        )
    },
}


class _Forwarder:
    """A meta path finder and loader (the protocols, without ``importlib.abc``: importing that pulls in
    ``importlib.resources`` and cost every ``import protocol`` ~8 ms, e.g. in each ``meshctl`` start)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)  # type: ignore[arg-type]  # a Loader by protocol

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        target = importlib.import_module(MOVED[spec.name])
        module = types.ModuleType(spec.name, f"Moved to {target.__name__}.")

        def __getattr__(name: str) -> object:
            return getattr(target, name)

        def __dir__() -> list[str]:
            return dir(target)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__dir__ = __dir__  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Forwarder) for f in sys.meta_path):
        sys.meta_path.append(_Forwarder())
