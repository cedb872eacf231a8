"""Hostile but enrolled nodes: a real ``Node`` (so it stays a member with a valid certificate) whose
outgoing traffic is rewritten.

* ``withhold``: never announces a new version and never serves the current body.
* ``replay``: answers every pull with the oldest policy it has seen (validly signed, but old), and
  pushes that old body unsolicited to peers it talks to.
* ``lure``: advertises the newest digest it knows (announces and syncs) so honest nodes pull from it.
* ``lie``: claims versions that do not exist and are never served: probes carry serial 2^62 (and an
  inflated root version), syncs and announces carry absurd digests or the *next* serial with a
  made-up hash (the same (root version, serial) the next real version will have).
* ``flood``: with every message it sends, asks the peer for the current body again (``FLOOD_PULLS``
  pulls) and re-announces its digest.

**The Byzantine guarantee** (checked by ``checks.convergence_bound_ms`` in ``simulations.measure``, an
invariant evaluated for every published version, and by ``tests/test_byzantine.py``): *with any f enrolled
Byzantine peers that do not partition the honest nodes, every honest node applies every valid
version within the normal convergence bound* — the bound measured for the same scenario without
hostile nodes, with a margin for the sources the hostile nodes do not provide.  Why it holds: a
claim is only a hint charged to one peer (at most one live claim per peer, a lifetime, a bounded
candidate set); every candidate is pulled on its own, so an unserved claim never shadows a version
an honest peer serves; stale bodies are judged against the verified floor only; equal versions with
different hashes are both verified before anything changes, and all nodes keep the lower hash.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from protocol.gossip import Node, Now, Send
from protocol.gossip.wire import Ack, Announce, Digest, Ping, PolicyPull, PolicyPush, Sync, decode, encode

BEHAVIOURS = ("replay", "withhold", "lure", "lie", "flood")
LIE_SERIAL = 1 << 62
LIE_ROOT_BUMP = 1000
FLOOD_PULLS = 5


class HostileNode:
    def __init__(self, node: Node, behaviours: list[str], old_envelope: bytes) -> None:
        self.node = node
        self.behaviours = set(behaviours)
        self.old = old_envelope
        self.rewritten = 0
        self.lies = 0
        self.flood_sent = 0

    @property
    def trust(self) -> Any:
        return self.node.trust

    def next_deadline(self) -> int | None:
        return self.node.next_deadline()

    def status(self, now: Now) -> dict:
        return self.node.status(now)

    def _lie(self) -> Digest:
        """Alternately an absurd version and the next serial with a made-up hash."""
        self.lies += 1
        t = self.node.trust
        if self.lies % 2:
            return Digest(LIE_SERIAL + self.lies, hashlib.sha256(b"lie%d" % self.lies).digest(),
                          t.root_version + (LIE_ROOT_BUMP if self.lies % 4 == 1 else 0))
        return Digest(t.serial + 1, hashlib.sha256(b"next%d" % self.lies).digest(), t.root_version)

    def handle(self, now: Now, inp: Any) -> list[Any]:
        out: list[Any] = []
        b = self.behaviours
        for eff in self.node.handle(now, inp):
            if not isinstance(eff, Send):
                out.append(eff)
                continue
            msg = decode(eff.data)
            if isinstance(msg, PolicyPush):
                if "replay" in b:
                    out.append(Send(eff.peer, eff.address, encode(PolicyPush(self.old))))
                    self.rewritten += 1
                elif "withhold" not in b:
                    out.append(eff)
                continue
            if isinstance(msg, Announce) and "withhold" in b and "lure" not in b:
                self.rewritten += 1
                continue
            if isinstance(msg, Sync) and "withhold" in b and "lure" not in b:
                msg = msgspec.structs.replace(msg, digest=None)
                eff = Send(eff.peer, eff.address, encode(msg))
            if "lie" in b:
                msg, eff = self._rewrite_lie(msg, eff)
            out.append(eff)
            if "replay" in b and isinstance(msg, Sync) and not msg.reply:
                out.append(Send(eff.peer, eff.address, encode(PolicyPush(self.old))))
            if "flood" in b and eff.peer:
                out.extend(self._flood(eff))
        return out

    def _rewrite_lie(self, msg: Any, eff: Send) -> tuple[Any, Send]:
        t = self.node.trust
        if isinstance(msg, (Ping, Ack)):
            msg = msgspec.structs.replace(msg, serial=LIE_SERIAL, root_version=t.root_version + LIE_ROOT_BUMP)
        elif isinstance(msg, Sync):
            msg = msgspec.structs.replace(msg, digest=self._lie())
        elif isinstance(msg, Announce):
            msg = msgspec.structs.replace(msg, digest=self._lie())
        else:
            return msg, eff
        self.rewritten += 1
        return msg, Send(eff.peer, eff.address, encode(msg))

    def _flood(self, eff: Send) -> list[Send]:
        t = self.node.trust
        h = bytes.fromhex(t.policy_hash) if t.policy_hash else b""
        pull = encode(PolicyPull(t.serial, h))
        out = [Send(eff.peer, eff.address, pull) for _ in range(FLOOD_PULLS)]
        if h:
            out.append(Send(eff.peer, eff.address, encode(Announce(Digest(t.serial, h, t.root_version)))))
        self.flood_sent += len(out)
        return out
