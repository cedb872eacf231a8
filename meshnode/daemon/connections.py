"""The authenticated channels this node holds: registering, serving, sending, dialing and closing them.

Gossip channels are kept per peer identity (the newest one sends), operator channels in a set; one
identity holds at most ``mesh.max_channels_per_peer`` of each. Inbound channels are accepted by the
mesh listener and handed here once authenticated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from protocol.channel import ConnectionKind, SecureSession
from protocol.errors import MeshError
from protocol.gossip import FrameReceived, PeerConnected, PeerDisconnected, SendFailed
from protocol.gossip import wire as gossip_wire
from protocol.trust import TrustedState

from .. import transport
from ..config import LoadedConfig
from ..identity import Identity
from ..metrics import Metrics
from ..transport import MESH_PATH, WS_MAX_MSG_BYTES, Conn
from .core_driver import CoreDriver
from .datagrams import DatagramPaths
from .logs import LogBudget
from .tasks import TaskSpawner

OPERATOR_REQUEST_BYTES = 4 << 20
"""An operator request: a policy envelope at its cap (1 MiB, e.g. 4,096 rules) plus a root chain."""
DIAL_TIMEOUT_S = 5


def channel_message_caps(operator_bytes: int = OPERATOR_REQUEST_BYTES) -> dict[ConnectionKind, int]:
    """What one channel may reassemble, per connection kind: exactly the largest gossip message a peer
    may legitimately send (a bigger one would be refused by the decoder anyway, after costing the
    memory), and an operator request."""
    return {ConnectionKind.GOSSIP: gossip_wire.MAX_MESSAGE_BYTES, ConnectionKind.OPERATOR: operator_bytes}


class ConnectionRegistry:
    def __init__(self, *, config: LoadedConfig, identity: Identity, trust: TrustedState, core: CoreDriver,
                 tasks: TaskSpawner, metrics: Metrics, log: Any, log_budget: LogBudget,
                 alert: Callable[[str, dict[str, Any]], None]) -> None:
        self.config = config  # replaced on reload
        self._identity = identity
        self._trust = trust
        self._core = core
        self._tasks = tasks
        self._metrics = metrics
        self._log = log
        self._log_budget = log_budget
        self._alert = alert
        self.http: aiohttp.ClientSession | None = None  # set once the daemon has its HTTP client
        self.gossip: dict[str, list[Conn]] = {}
        self.operators: set[Conn] = set()
        self.handshaking: set[Conn] = set()  # inbound channels still in their handshake
        self._by_address: dict[str, Conn] = {}
        self._dialing: dict[str, list[bytes]] = {}  # address -> messages waiting for the dial
        self._bytes_counted: dict[str, Any] = {}  # direction -> its child of the bytes counter
        self.datagrams = DatagramPaths(feed=core.feed_if_running, stream_send=self._enqueue, metrics=metrics, log=log,
                                       wake=core.wake)

    # -- counts and sessions ----------------------------------------------------------------------------
    def gossip_count(self) -> int:
        return sum(len(v) for v in self.gossip.values())

    def total(self) -> int:
        return self.gossip_count() + len(self.operators)

    def queues_empty(self) -> bool:
        return all(c.queue.empty() for cs in self.gossip.values() for c in cs)

    def on_bytes(self, direction: str, n: int) -> None:
        counter = self._bytes_counted.get(direction)
        if counter is None:  # looked up once per direction: this runs for every frame
            counter = self._bytes_counted[direction] = self._metrics.bytes.labels(direction)
        counter.inc(n)

    def new_session(self, *, initiator: bool, expected_peer: str | None = None) -> SecureSession:
        mesh = self.config.cfg.mesh
        return SecureSession(
            initiator=initiator,
            trust=self._trust,
            static_private=self._identity.static_private,
            certificate=self._identity.cert_bytes,
            entropy=transport.entropy,
            now_ms=transport.now_ms(),
            accept=frozenset({ConnectionKind.GOSSIP}) if initiator
            else frozenset({ConnectionKind.GOSSIP, ConnectionKind.OPERATOR}),
            expected_peer=expected_peer,
            handshake_timeout_ms=mesh.handshake_timeout_ms,
            max_message_bytes=channel_message_caps(mesh.max_message_bytes),
        )

    # -- gossip channels --------------------------------------------------------------------------------
    def _register(self, conn: Conn) -> None:
        peer = conn.peer
        channels = self.gossip.setdefault(peer, [])
        self._limit_channels(channels, "gossip")
        channels.append(conn)
        self._metrics.connections.labels("gossip").set(self.gossip_count())
        self._log.debug("peer.connected", peer=peer, conn=conn.id, inbound=conn.inbound)
        cert = conn.session.peer_certificate or b""
        self.datagrams.attach(conn, None if conn.inbound else _endpoint(conn.address))
        self._core.feed(PeerConnected(peer=peer, cert_bytes=cert))

    def _unregister(self, conn: Conn) -> None:
        peer = conn.peer
        self.datagrams.detach(conn)
        channels = self.gossip.get(peer, [])
        if conn in channels:
            channels.remove(conn)
        if not channels:
            self.gossip.pop(peer, None)
            self._core.feed_if_running(PeerDisconnected(peer=peer))
        self._metrics.connections.labels("gossip").set(self.gossip_count())

    async def _on_gossip(self, conn: Conn, data: bytes) -> None:
        self._core.feed(FrameReceived(peer=conn.peer, data=data), {"peer": conn.peer, "via": "stream"})

    async def serve_gossip(self, conn: Conn, pending: Sequence[bytes] = ()) -> None:
        """Register an authenticated gossip channel, queue ``pending`` (messages that waited for its dial)
        and run it until it ends; its failure costs only itself."""
        self._register(conn)
        for data in pending:
            conn.enqueue(data)
        writer = self._tasks.start(self._write(conn))
        reason = "closed"
        try:
            reason = await transport.reader(conn, self._on_gossip, self.on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            reason = transport.refusal_reason(exc)
            if isinstance(exc, transport.HandshakeRefusedError):
                # Our own certificate was refused (revoked, expired, another authority): say it loudly,
                # but not on every redial.
                self._metrics.handshakes.labels("refused_by_peer", exc.reason).inc()
                if self._log_budget.allow("peer.refused_us", transport.now_ms()):
                    self._log.warning("peer.refused_us", peer=conn.peer, reason=exc.reason,
                                      suppressed=self._log_budget.take_suppressed("peer.refused_us"))
            else:
                self._metrics.frames_refused.labels(reason).inc()
                self._log.info("peer.dropped", peer=conn.peer, conn=conn.id, reason=reason, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a bug hit by one peer's input costs that peer
            reason = "internal_error"
            self._metrics.frames_refused.labels(reason).inc()
            self._alert("node.internal_error", {"peer": conn.peer, "error": f"{type(exc).__name__}: {exc}"[:300]})
            self._log.error("peer.handler_crashed", peer=conn.peer, conn=conn.id, exc_info=exc)
        finally:
            await transport.close(conn, reason)
            writer.cancel()
            self._unregister(conn)

    async def _write(self, conn: Conn) -> None:
        try:
            await transport.writer(conn, self.on_bytes)
        except (MeshError, aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as exc:
            self._log.info("peer.write_failed", peer=conn.peer, reason=transport.refusal_reason(exc))
            await transport.close(conn, "write failed")

    def _limit_channels(self, existing: Sequence[Conn], kind: str) -> None:
        """One identity holds at most `max_channels_per_peer` channels: a new one closes the oldest
        (a redial after a silent loss must win, and a rogue's extra channels cost it its old ones)."""
        live = [c for c in existing if not c.closed and not c.retired]
        for old in live[: max(0, len(live) - self.config.cfg.mesh.max_channels_per_peer + 1)]:
            self._metrics.frames_refused.labels("too_many_channels").inc()
            if self._log_budget.allow(f"peer.channel_limit/{kind}", transport.now_ms()):
                self._log.info("peer.channel_limit", peer=old.peer, kind=kind, closed=old.id,
                               suppressed=self._log_budget.take_suppressed(f"peer.channel_limit/{kind}"))
            old.retired = True
            self._tasks.spawn(transport.close(old, "too many channels for this identity"))

    # -- operator channels ------------------------------------------------------------------------------
    async def serve_operator(self, conn: Conn, on_message: Callable[[Conn, bytes], Awaitable[None]]) -> None:
        """Run an authenticated operator channel until it ends, each request going to ``on_message``."""
        operator = conn.peer
        self._limit_channels(sorted((c for c in self.operators if c.peer == operator), key=lambda c: c.id),
                             "operator")
        self.operators.add(conn)
        self._metrics.connections.labels("operator").set(len(self.operators))
        self._log.info("operator.connected", operator=operator, conn=conn.id)
        writer = self._tasks.start(self._write(conn))
        try:
            await transport.reader(conn, on_message, self.on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            self._metrics.frames_refused.labels(transport.refusal_reason(exc)).inc()
            self._log.info("operator.dropped", operator=operator, reason=transport.refusal_reason(exc))
        finally:
            await transport.close(conn, "done")
            writer.cancel()
            self.operators.discard(conn)
            self._metrics.connections.labels("operator").set(len(self.operators))

    # -- sending and dialing ----------------------------------------------------------------------------
    def send(self, peer: str, address: str, data: bytes) -> str:
        """Send a message as a datagram on a channel to the peer whose datagram path is up (the newest
        first), else queue it on the newest channel's stream (or the one to ``address``), else dial it.
        Returns how it went: ``datagram``, ``stream``, ``dial`` or ``failed``."""
        channels = self.gossip.get(peer) if peer else None
        for channel in reversed(channels or ()):
            if not channel.closed and self.datagrams.send(channel, data):
                return "datagram"
        conn = channels[-1] if channels else self._by_address.get(address)
        if conn is not None and not conn.closed:
            self._enqueue(conn, data)
            return "stream"
        if not address:
            self._core.feed_later(SendFailed(peer=peer, address=address))
            return "failed"
        if address in self._dialing:
            self._dialing[address].append(data)
            return "dial"
        self._dialing[address] = [data]
        self._tasks.spawn(self._dial(address, peer))
        return "dial"

    def _enqueue(self, conn: Conn, data: bytes) -> None:
        """Queue a message on the stream of ``conn``; a peer too slow to drain its queue is closed."""
        if not conn.enqueue(data) and not conn.closed:
            self._log.warning("peer.slow", peer=conn.peer, queued=conn.queue.qsize())
            self._metrics.frames_refused.labels("send_queue_full").inc()
            self._tasks.spawn(transport.close(conn, "send queue full"))

    async def _dial(self, address: str, peer: str) -> None:
        assert self.http is not None
        log = self._log.bind(peer=peer or None, address=address)
        conn: Conn | None = None
        try:
            ws = await asyncio.wait_for(
                self.http.ws_connect(f"http://{address}{MESH_PATH}", max_msg_size=WS_MAX_MSG_BYTES,
                                     autoping=True, heartbeat=None),
                timeout=DIAL_TIMEOUT_S,
            )
            conn = Conn(ws=ws, session=self.new_session(initiator=True, expected_peer=peer or None),
                        inbound=False, address=address)
            await transport.handshake(conn, self.on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            self._dialing.pop(address, None)
            reason = transport.refusal_reason(exc)
            self._metrics.handshakes.labels("failed", reason).inc()
            log.info("dial.failed", reason=reason, detail=str(exc)[:200])
            if conn is not None:
                await transport.close(conn, reason)
            self._core.feed_if_running(SendFailed(peer=peer, address=address))
            return
        self._metrics.handshakes.labels("ok", "outbound").inc()
        pending = self._dialing.pop(address, [])
        self._by_address[address] = conn
        try:
            await self.serve_gossip(conn, pending)
        finally:
            if self._by_address.get(address) is conn:
                del self._by_address[address]

    # -- closing --------------------------------------------------------------------------------------
    def close_peer(self, peer: str, reason: str) -> None:
        for c in list(self.gossip.get(peer, [])):
            self._tasks.spawn(transport.close(c, reason))

    def revalidate(self) -> None:
        """Certificates expire and get revoked while channels are open: close every channel whose peer's
        certificate no longer holds."""
        wall = time.time()
        for c in [c for conns in self.gossip.values() for c in conns] + list(self.operators):
            if c.closed:
                continue
            try:
                c.session.revalidate(wall)
            except MeshError as exc:
                self._log.warning("peer.revoked", peer=c.peer, reason=str(exc))
                self._metrics.handshakes.labels("revoked", transport.refusal_reason(exc)).inc()
                self._tasks.spawn(transport.close(c, "certificate no longer valid"))

    async def close_all(self, reason: str) -> None:
        """Close every channel at once: one stalled peer must not hold up the others (each close waits up
        to a few seconds for the peer's reply)."""
        closing = [c for conns in self.gossip.values() for c in conns] + list(self.operators)
        closing += list(self.handshaking)
        await asyncio.gather(*(transport.close(c, reason) for c in closing))


def _endpoint(address: str) -> tuple[str, int] | None:
    """The UDP endpoint of a peer's mesh address (its TCP listener's host and port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
