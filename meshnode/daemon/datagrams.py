"""Small gossip over encrypted UDP datagrams: the shell side of protocol.channel.datagram.

Every authenticated gossip channel (WebSocket + Noise XX over TCP) also gets a datagram path to the same
peer, keyed from that channel's handshake.  Small dissemination messages (announces, pulls, small policy
and root bodies: up to ``MAX_FRAME`` bytes) then go as one datagram each, so a lost packet costs one
retransmission timed from the path's measured round trip (milliseconds on a LAN) instead of TCP's
~200 ms timer.  Bodies up to ``MAX_FRAGMENTED`` bytes (a policy of a few kilobytes) go zlib-compressed
when that takes fewer datagrams (to peers whose probe said they inflate: ``ZFRAME``, ``ZFRAG``), and as
several datagrams when still larger than one, each acknowledged and retransmitted on its own
(``datagram_frags``).  Everything else (probes,
directory sync, larger bodies) stays on the stream.

* Path check: the side that knows the peer's UDP endpoint (the dialer: the peer's mesh address; the
  acceptor once an authentic datagram arrived) sends a probe; the path carries frames once a probe was
  answered.  Unanswered after ``PROBE_TRIES`` tries (UDP blocked, a NAT): the peer stays on the stream
  (``stream_only`` in status) and is probed again after ``reprobe_after_s`` (0.5 s for ~15 s: a peer
  drops our datagrams until its firewall lists us as a member, then doubling up to 30 s)
  (an answer to any of the recent probes, however late, puts the path up: a peer busy at start answers
  after the timeout, and the answer still proves the path)
  (a node too busy to answer for a second, as at start, must not keep its peers on TCP for long); an
  authentic probe from the peer of a blocked path makes it probe back at once.
* Reliability: each frame carries a message id; the receiver hands it to the core once (ids seen are
  remembered per path) and acknowledges it; the sender retransmits after ``rto`` (from the smoothed
  probe and ack round trips) up to ``SEND_TRIES`` times in all, then sends it on the stream.
* Hostile input: a datagram is rate limited per source address before any crypto, must name a live
  session, authenticate and be fresh (the replay window); each refusal is counted by reason and never
  answered.  Only authentic datagrams are answered, each answer no larger than what it answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.channel.datagram import DatagramChannel, DatagramRefused, receiver_id
from protocol.channel.datagram_policy import (
    FEATURE_ZLIB,
    MAX_FRAME,
    PROBE_TIMEOUT_S,
    PROBE_TRIES,
    REPROBE_FLAT_EPISODES,
    SEND_TRIES,
    compressed,
    datagram_worthy,
    inflated,
    is_body,
    reprobe_after_s,
    retry_after_s,
    smoothed_rtt,
)
from protocol.channel.datagram_policy import ID_HEADER as _ID
from protocol.channel.datagram_policy import (
    MAX_FRAGMENTED as MAX_FRAGMENTED,  # re-exported: the largest body that goes as datagrams
)
from protocol.channel.datagram_policy import rto_s as _rto
from protocol.channel.rate_limit import HandshakeRateLimiter
from protocol.errors import LocalProtocolError
from protocol.gossip.events import FrameReceived

from ..metrics import Metrics
from ..transport import Conn
from .datagram_frags import FragmentRefused, Reassembly, split

PROBE, PROBE_ACK, FRAME, FRAME_ACK, FRAG, ZFRAME, ZFRAG = 1, 2, 3, 4, 5, 6, 7
FEATURES = bytes([FEATURE_ZLIB])  # after a probe's id header: what this node takes (compressed messages)
# Which messages go as datagrams (DATAGRAM_TAGS, MAX_FRAME, MAX_FRAGMENTED), the probe and
# retransmission timers: protocol.channel.datagram_policy (shared with the simulator's model).
SEEN_IDS = 512
SOURCE_RATE_PER_S, SOURCE_BURST = 2000.0, 4000  # per source address, before any crypto
MAX_SOURCES = 4096


@dataclass(eq=False)
class _Path:
    conn: Conn
    channel: DatagramChannel
    endpoint: tuple[str, int] | None
    up: bool = False
    probes: int = 0
    probe_at: float = 0.0  # next probe (monotonic s); 0: none due
    # the probes sent lately, nonce -> when: an answer to any of them puts the path up (a peer busy at
    # start answers after its probe's timeout; the answer still proves the path)
    probes_out: dict[int, float] = field(default_factory=dict)
    srtt_s: float | None = None
    zlib: bool = False  # the peer inflates compressed messages (its probe or probe answer said so)
    episodes: int = 0  # blocked episodes in a row (3 unanswered probes each)
    reassembly: Reassembly = field(default_factory=Reassembly)
    seen: collections.OrderedDict[int, None] = field(default_factory=collections.OrderedDict)

    @property
    def rto_s(self) -> float:
        return _rto(self.srtt_s)

    def rtt_sample(self, rtt_s: float) -> None:
        self.srtt_s = smoothed_rtt(self.srtt_s, rtt_s)


@dataclass(eq=False)
class _Pending:
    path: _Path
    data: bytes
    first_sent: float
    retry_at: float
    tries: int = 1
    kind: int = FRAME
    message: int = 0  # a fragment's message id (0: a whole frame)
    whole: bytes = b""  # the whole message, when ``data`` is a fragment or compressed: what the stream carries
    body: bool = False  # a policy or root body (a shorter first wait: ``retry_after_s``)


class DatagramPaths(asyncio.DatagramProtocol):
    def __init__(self, *, feed: Callable[..., Any], stream_send: Callable[[Conn, bytes], None], metrics: Metrics,
                 log: Any, wake: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._feed = feed  # the core driver's feed
        self._wake = wake  # the scheduler re-reads next_deadline
        self._stream_send = stream_send  # fallback: queue on the channel
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self.bound: str | None = None
        self._by_id: dict[bytes, _Path] = {}
        self._by_conn: dict[Conn, _Path] = {}
        self._pending: dict[int, _Pending] = {}
        self._probing: dict[_Path, None] = {}  # the paths with a probe due (probe_at set), in order
        self._ids = itertools.count(1)
        self._limiter = HandshakeRateLimiter(SOURCE_RATE_PER_S, SOURCE_BURST, max_sources=MAX_SOURCES)
        self._bodies_settled = asyncio.Event()  # set whenever a body datagram stops being in flight
        self.counts = {"sent": 0, "received": 0, "retransmits": 0, "fallbacks": 0, "acked": 0, "fragmented": 0,
                       "reassembled": 0, "compressed": 0}
        self.refused: dict[str, int] = {}
        # the per-datagram counters' children, looked up once (a label lookup takes a lock and a dict walk)
        self._counted = {event: metrics.datagrams.labels(event)
                         for event in ("sent", "received", "retransmit", "fallback", "duplicate")}

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> None:
        """Bind the UDP side of the mesh port; when that fails every peer stays on the stream."""
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        except OSError as exc:
            self._log.warning("datagram.unavailable", listen=f"{host}:{port}", error=exc.strerror or str(exc))
            return
        self.bound = f"{host}:{port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDPTransport is no asyncio subclass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -- channels -------------------------------------------------------------------------------------
    def attach(self, conn: Conn, endpoint: tuple[str, int] | None) -> None:
        """An authenticated gossip channel: its datagram path (probed at once when ``endpoint`` is known)."""
        if self.transport is None:
            return
        try:
            channel = DatagramChannel(conn.session.datagram_keys())
        except LocalProtocolError:
            return
        path = _Path(conn, channel, endpoint)
        if endpoint is not None:
            self._probe_at(path, self._clock())
        self._by_id[channel.keys.recv_id] = path
        self._by_conn[conn] = path
        if endpoint is not None:
            self._probe(path, self._clock())

    def detach(self, conn: Conn) -> None:
        path = self._by_conn.pop(conn, None)
        if path is None:
            return
        self._by_id.pop(path.channel.keys.recv_id, None)
        self._probing.pop(path, None)
        for mid, p in list(self._pending.items()):
            if p.path is path:
                del self._pending[mid]
        self._bodies_settled.set()

    # -- sending --------------------------------------------------------------------------------------
    def send(self, conn: Conn, data: bytes) -> bool:
        """Send ``data`` as a datagram if it is small dissemination and the path is up; False: use the stream."""
        path = self._by_conn.get(conn)
        if path is None or not path.up or not datagram_worthy(data):
            return False
        now = self._clock()
        first_wait = retry_after_s(path.rto_s, 1, is_body(data))
        packed = compressed(data) if path.zlib else None
        body, whole_kind, frag_kind = (data, FRAME, FRAG) if packed is None else (packed, ZFRAME, ZFRAG)
        if packed is not None:
            self.counts["compressed"] += 1
        if len(body) <= MAX_FRAME:
            mid = next(self._ids)
            self._pending[mid] = _Pending(path, body, now, now + first_wait, kind=whole_kind,
                                          whole=data if packed is not None else b"", body=is_body(data))
            self._seal_to(path, _ID.pack(whole_kind, mid) + body)
        else:
            message = next(self._ids)
            self.counts["fragmented"] += 1
            for frag in split(body, message, MAX_FRAME):
                fid = next(self._ids)
                self._pending[fid] = _Pending(path, frag, now, now + first_wait, kind=frag_kind, message=message,
                                              whole=data, body=is_body(data))
                self._seal_to(path, _ID.pack(frag_kind, fid) + frag)
        self._wake()
        return True

    def _seal_to(self, path: _Path, payload: bytes) -> None:
        if self.transport is None or path.endpoint is None:
            return
        try:
            self.transport.sendto(path.channel.seal(payload), path.endpoint)
        except (OSError, LocalProtocolError) as exc:
            self._metrics.datagrams.labels("send_failed").inc()
            self._log.debug("datagram.send_failed", peer=path.conn.peer, error=str(exc)[:200])
            return
        self.counts["sent"] += 1
        self._counted["sent"].inc()

    def _probe(self, path: _Path, now: float) -> None:
        path.probes += 1
        nonce = next(self._ids)
        path.probes_out[nonce] = now
        while len(path.probes_out) > 2 * PROBE_TRIES:
            del path.probes_out[next(iter(path.probes_out))]
        self._probe_at(path, now + PROBE_TIMEOUT_S[min(path.probes, len(PROBE_TIMEOUT_S)) - 1])
        self._seal_to(path, _ID.pack(PROBE, nonce) + FEATURES)
        self._wake()

    def _probe_at(self, path: _Path, when: float) -> None:
        """Set (``when`` > 0) or clear (0) the path's next probe; ``_probing`` keeps the paths that have one."""
        path.probe_at = when
        if when:
            self._probing[path] = None
        else:
            self._probing.pop(path, None)

    def bodies_in_flight(self) -> bool:
        """Some body (policy or root) sent as datagrams is not acknowledged yet and has a retransmission
        to come (not sent ``SEND_TRIES`` times, not gone to the stream)."""
        return any(p.body and p.tries < SEND_TRIES for p in self._pending.values())

    async def bodies_delivered(self, timeout_s: float) -> None:
        """Wait, at most ``timeout_s``, until every body sent as datagrams is acknowledged or was sent its
        last time (10 and 30 ms after the first: ``retry_after_s``): the enforcer waits for this before
        it applies, so a busy apply does not hold up the retransmission of a lost push (its subtree's
        version), and does not wait longer for the acknowledgements of a peer that is slow to send them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.bodies_in_flight() and (left := deadline - loop.time()) > 0:
            self._bodies_settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._bodies_settled.wait()

    # -- timers ---------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        due = min((p.retry_at for p in self._pending.values()), default=None)
        for p in self._probing:  # (the paths not up yet, or probed a moment ago: few once the mesh is up)
            if due is None or p.probe_at < due:
                due = p.probe_at
        return due

    def tick(self) -> None:
        now = self._clock()
        for mid, p in list(self._pending.items()):
            if now < p.retry_at:
                continue
            if mid not in self._pending:  # a fragment of a message that fell back just now
                continue
            if p.tries >= SEND_TRIES or p.path.conn.closed:
                del self._pending[mid]
                self._bodies_settled.set()
                if p.message:  # the whole message goes on the stream once; its other fragments stop
                    for other in [k for k, q in self._pending.items() if q.message == p.message]:
                        del self._pending[other]
                self.counts["fallbacks"] += 1
                self._counted["fallback"].inc()
                if not p.path.conn.closed:
                    self._stream_send(p.path.conn, p.whole or p.data)
                continue
            p.tries += 1
            p.retry_at = now + retry_after_s(p.path.rto_s, p.tries, p.body)
            if p.body:
                self._bodies_settled.set()
            self.counts["retransmits"] += 1
            self._counted["retransmit"].inc()
            self._seal_to(p.path, _ID.pack(p.kind, mid) + p.data)
        for path in list(self._probing):
            if now < path.probe_at:
                continue
            if path.up:
                self._probe_at(path, 0.0)
            elif path.probes < PROBE_TRIES:
                self._probe(path, now)
            else:  # blocked: stay on the stream, look again later
                self._metrics.datagrams.labels("path_blocked").inc()
                if path.episodes in (0, REPROBE_FLAT_EPISODES):  # logged when blocked, and when backing off
                    self._log.info("datagram.path_blocked", peer=path.conn.peer, endpoint=str(path.endpoint),
                                   episodes=path.episodes + 1)
                path.probes = 0
                path.episodes += 1
                self._probe_at(path, now + reprobe_after_s(path.episodes))

    # -- receiving ------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        source = str(addr[0])
        if not self._allow(source):
            self._refuse("rate_limited")
            return
        rid = receiver_id(data)
        path = self._by_id.get(rid) if rid is not None else None
        if path is None:
            self._refuse("unknown_session" if rid is not None else "truncated")
            return
        try:
            payload = path.channel.open(data)
        except DatagramRefused as exc:
            self._refuse(exc.reason)
            return
        if len(payload) < _ID.size:
            self._refuse("malformed")
            return
        kind, number = _ID.unpack_from(payload)
        self.counts["received"] += 1
        self._counted["received"].inc()
        now = self._clock()
        if path.endpoint != addr:  # learned (acceptor) or moved: authentic, so follow it (as WireGuard)
            known = path.endpoint is not None
            path.endpoint = addr
            if not known and not path.up:
                self._probe(path, now)
        if kind in (PROBE, PROBE_ACK) and len(payload) > _ID.size:
            path.zlib = bool(payload[_ID.size] & FEATURE_ZLIB)
        if kind == PROBE:  # answered with our features only when it carried the peer's: never larger
            self._seal_to(path, _ID.pack(PROBE_ACK, number) + (FEATURES if len(payload) > _ID.size else b""))
            if not path.up and path.probes == 0 and path.probe_at > now:  # blocked, waiting: it is open now
                self._probe(path, now)
        elif kind == PROBE_ACK:
            sent = path.probes_out.pop(number, None)
            if sent is not None and not path.up:
                path.up = True
                self._probe_at(path, 0.0)
                path.probes_out.clear()
                path.episodes = 0
                if now - sent <= PROBE_TIMEOUT_S[0]:  # a late answer says the peer was busy, not the path's round trip
                    path.rtt_sample(now - sent)
                self._log.debug("datagram.path_up", peer=path.conn.peer, rtt_ms=round(1000 * (now - sent), 2))
        elif kind in (FRAME, FRAG, ZFRAME, ZFRAG):
            self._seal_to(path, _ID.pack(FRAME_ACK, number))
            if number in path.seen:
                self._counted["duplicate"].inc()
                return
            path.seen[number] = None
            if len(path.seen) > SEEN_IDS:
                path.seen.popitem(last=False)
            self._on_frame(path, kind, bytes(payload[_ID.size:]), now)
        elif kind == FRAME_ACK:
            p = self._pending.pop(number, None)
            if p is not None and p.body:
                self._bodies_settled.set()
            if p is not None and p.path is path:
                self.counts["acked"] += 1
                if p.tries == 1:
                    path.rtt_sample(now - p.first_sent)
        else:
            self._refuse("malformed")

    def _on_frame(self, path: _Path, kind: int, body: bytes, now: float) -> None:
        """A new frame or fragment (acknowledged already): reassembled, inflated and fed to the core."""
        origin: dict[str, Any] = {"peer": path.conn.peer, "via": "datagram"}
        if kind in (FRAG, ZFRAG):
            try:
                whole = path.reassembly.add(body, now)
            except FragmentRefused as exc:
                self._refuse(exc.reason)
                return
            if whole is None:
                return
            self.counts["reassembled"] += 1
            body = whole
            origin.update(via="fragments", wait_ms=round(1000 * path.reassembly.last_wait_s, 1))
        if kind in (ZFRAME, ZFRAG):
            try:
                body = inflated(body)
            except ValueError:
                self._refuse("inflate_failed")
                return
            origin["compressed"] = True
        self._feed(FrameReceived(peer=path.conn.peer, data=body), origin)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and the like: the stream carries on
        self._metrics.datagrams.labels("icmp_error").inc()

    def _allow(self, source: str) -> bool:
        return self._limiter.allow(source, int(self._clock() * 1000))

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._metrics.frames_refused.labels(f"datagram_{reason}").inc()

    # -- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        paths = list(self._by_conn.values())
        return {
            "udp": self.bound or "unavailable",
            "peers_datagram": sorted({p.conn.peer for p in paths if p.up}),
            "peers_stream_only": sorted({p.conn.peer for p in paths if not p.up} - {p.conn.peer for p in paths if p.up}),
            # the retransmission timers of the paths that carry datagrams (from their smoothed round trips)
            "rto_ms": sorted(round(1000 * p.rto_s, 1) for p in paths if p.up),
            **self.counts,
            "refused": dict(sorted(self.refused.items())),
        }
