"""Hostile but enrolled nodes: a real ``Node`` (so it stays a member with a valid certificate) whose
outgoing traffic is rewritten.

* ``withhold``: never announces a new version and never serves the current body.
* ``replay``: answers every pull with the oldest policy it has seen (validly signed, but old), and
  pushes that old body unsolicited to peers it talks to.
* ``lure``: advertises the newest digest it knows (announces and syncs) so honest nodes pull from it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.gossip_events import Now, Send
from protocol.gossip_wire import Announce, PolicyPush, Sync, decode, encode
from protocol.node import Node


class HostileNode:
    def __init__(self, node: Node, behaviours: list[str], old_envelope: bytes) -> None:
        self.node = node
        self.behaviours = set(behaviours)
        self.old = old_envelope
        self.rewritten = 0

    @property
    def trust(self) -> Any:
        return self.node.trust

    def next_deadline(self) -> int | None:
        return self.node.next_deadline()

    def status(self, now: Now) -> dict:
        return self.node.status(now)

    def handle(self, now: Now, inp: Any) -> list[Any]:
        out: list[Any] = []
        for eff in self.node.handle(now, inp):
            if not isinstance(eff, Send):
                out.append(eff)
                continue
            msg = decode(eff.data)
            if isinstance(msg, PolicyPush):
                if "replay" in self.behaviours:
                    out.append(Send(eff.peer, eff.address, encode(PolicyPush(self.old))))
                    self.rewritten += 1
                elif "withhold" not in self.behaviours:
                    out.append(eff)
                continue
            if isinstance(msg, Announce) and "withhold" in self.behaviours and "lure" not in self.behaviours:
                self.rewritten += 1
                continue
            if isinstance(msg, Sync) and "withhold" in self.behaviours and "lure" not in self.behaviours:
                msg = msgspec.structs.replace(msg, digest=None)
                eff = Send(eff.peer, eff.address, encode(msg))
            out.append(eff)
            if "replay" in self.behaviours and isinstance(msg, Sync) and not msg.reply:
                out.append(Send(eff.peer, eff.address, encode(PolicyPush(self.old))))
        return out
