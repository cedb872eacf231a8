"""The operator API: requests on an authenticated operator channel (publish a policy, read the status or
this node's open alerts).  A publish is acknowledged (``ok``) only once the version is verified *and* on
disk: a version the node could not write (a full disk) is enforced and gossiped, but not acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from protocol.gossip import PolicyResult

from ..metrics import Metrics
from ..transport import Conn


class OperatorRequest(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    envelope: bytes = b""
    roots: list[bytes] = []


class OperatorApi:
    def __init__(self, *, submit_policy: Callable[[bytes, str, Sequence[bytes]], PolicyResult],
                 not_durable: Callable[[], str | None], status: Callable[[], dict[str, Any]],
                 alerts: Callable[[], list[dict[str, Any]]], metrics: Metrics, log: Any) -> None:
        self._submit_policy = submit_policy
        self._not_durable = not_durable
        self._status = status
        self._alerts = alerts
        self._metrics = metrics
        self._log = log

    async def handle(self, conn: Conn, data: bytes) -> None:
        """Answer one request on ``conn`` (a reply for every request, a refusal for a malformed one)."""
        try:
            req = msgspec.msgpack.decode(data, type=OperatorRequest) if len(data) <= conn.session.max_message_bytes else None
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            req = None
        if req is None:
            self._metrics.frames_refused.labels("bad_operator_request").inc()
            conn.enqueue(msgspec.msgpack.encode({"ok": False, "reason": "malformed request"}))
            return
        if req.op == "publish":
            source = f"operator:{conn.peer}:{conn.id}"
            result = self._submit_policy(req.envelope, source, req.roots)
            self._log.info("operator.publish", operator=conn.peer, accepted=result.accepted, serial=result.serial,
                           reason=result.text)
            reply = {"ok": result.accepted, "serial": result.serial, "reason": result.text}
            unsaved = self._not_durable() if result.accepted else None
            if unsaved is not None:
                # Verified and enforced, but a crash now would lose it: not an acknowledgement.
                self._metrics.policies_refused.labels("not_durable").inc()
                reply = {"ok": False, "serial": result.serial, "durable": False,
                         "reason": f"verified and enforced, but not stored durably ({unsaved}); the node retries "
                                   "the write: publish through another node to be sure it is kept"}
        elif req.op == "status":
            reply = {"ok": True, "status": self._status()}
        elif req.op == "alerts":
            reply = {"ok": True, "alerts": self._alerts(), "status": self._status()}
        else:
            reply = {"ok": False, "reason": f"unknown operation {req.op!r}"}
        conn.enqueue(msgspec.msgpack.encode(reply))
