"""Operator client: one authenticated Noise channel to a node, one request, one reply."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from protocol.channel import ConnectionKind, MessageReceived, PeerClosed, SecureSession
from protocol.errors import MeshError
from protocol.trust import TrustedState

from . import transport
from .identity import load_identity_dir
from .transport import MESH_PATH, WS_MAX_MSG_BYTES, Conn


class OperatorError(MeshError):
    """The node could not be reached or refused the request."""


def _noop(direction: str, n: int) -> None:
    return None


async def request(node: str, identity_dir: Path, req: dict[str, Any], timeout_s: float = 20.0) -> dict[str, Any]:
    ident = load_identity_dir(identity_dir)
    trust = TrustedState(ident.anchor)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as http:
        try:
            ws = await asyncio.wait_for(
                http.ws_connect(f"http://{node}{MESH_PATH}", max_msg_size=WS_MAX_MSG_BYTES), timeout_s
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise OperatorError(f"cannot reach {node}: {str(exc) or type(exc).__name__}") from None
        session = SecureSession(
            initiator=True, trust=trust, static_private=ident.static_private, certificate=ident.cert_bytes,
            entropy=transport.entropy, now_ms=transport.now_ms(), accept=frozenset({ConnectionKind.OPERATOR}),
        )
        conn = Conn(ws=ws, session=session, inbound=False, address=node)
        try:
            await asyncio.wait_for(transport.handshake(conn, _noop), timeout_s)
            await transport.send_frames(conn, session.send_message(msgspec.msgpack.encode(req)), _noop)
            deadline = time.monotonic() + timeout_s
            while True:
                msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise OperatorError(f"{node} closed the connection")
                for ev in session.receive_frame(msg.data, transport.now_ms(), time.time()):
                    if isinstance(ev, MessageReceived):
                        try:
                            reply = msgspec.msgpack.decode(ev.data, type=dict)
                        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                            raise OperatorError(f"{node} sent a malformed reply") from None
                        await transport.close(conn, "done")
                        return reply
                    if isinstance(ev, PeerClosed):
                        raise OperatorError(f"{node} closed the channel: {ev.reason}")
        except TimeoutError:
            raise OperatorError(f"{node}: no answer within {timeout_s:.0f} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise OperatorError(f"{node}: {str(exc) or type(exc).__name__}") from None
        except MeshError as exc:
            if isinstance(exc, OperatorError):
                raise
            raise OperatorError(f"{node}: channel refused: {exc}") from None
        finally:
            await transport.close(conn, "done")


def publish(node: str, identity_dir: Path, envelope: bytes, roots: list[bytes] | None = None,
            timeout_s: float = 20.0) -> dict[str, Any]:
    return asyncio.run(request(node, identity_dir, {"op": "publish", "envelope": envelope, "roots": roots or []},
                               timeout_s))


def status(node: str, identity_dir: Path, timeout_s: float = 20.0) -> dict[str, Any]:
    reply = asyncio.run(request(node, identity_dir, {"op": "status"}, timeout_s))
    if not reply.get("ok"):
        raise OperatorError(f"{node}: {reply.get('reason', 'status refused')}")
    return dict(reply["status"])
