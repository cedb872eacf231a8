"""The network model: region latency matrix with jitter, loss, duplication, reordering, partitions,
host outages, and the transport the daemon really uses.

``tcp`` (default) models one TCP connection (WebSocket + Noise) per peer pair: a lost segment shows up
as a retransmission delay (RTO = RTT + min RTO, doubling per repeated loss) and head-of-line blocking,
never as a lost message; a partition or a dead host breaks the connection after the user timeout;
dialling costs ``connect_rtts`` round trips and fails after the connect timeout (unreachable) or one
RTT (refused); a failed dial backs off exponentially.  ``mixed`` is what the daemon does: small
dissemination messages between peers with a connection go as acknowledged, retransmitted datagrams
(``simulations.datagrams``), the rest on the TCP model.  ``datagram`` delivers every message on its
own (lost, duplicated or reordered), which stresses the protocol beyond what any transport lets through.

All randomness comes from the ``random.Random`` given in; every time is integer milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .datagrams import NEVER, probe_up_at
from .scenario import NetworkCfg, TcpCfg


@dataclass(slots=True)
class Cut:
    start: int
    end: int
    side: bytearray  # 1 = side A, 0 = side B, per node index
    authority_side: int = 0


@dataclass(slots=True)
class Conn:
    ready_at: int
    epoch_a: int
    epoch_b: int
    last_ab: int = 0
    last_ba: int = 0
    fail_at: int = NEVER  # a dial that fails, or a connection that breaks, at this time
    broken: bool = False
    dgram_lo: int = NEVER  # ``mixed``: when the lower node's datagram path to the higher is up
    dgram_hi: int = NEVER


class Network:
    def __init__(self, cfg: NetworkCfg, tcp: TcpCfg, regions: list[str], node_region: list[int],
                 rng: random.Random) -> None:
        self.cfg = cfg
        self.tcp = tcp
        self.rng = rng
        self.node_region = node_region
        nr = len(regions)
        self.lat = [[cfg.intra_region_ms if i == j else cfg.cross_region_ms for j in range(nr)] for i in range(nr)]
        index = {r: i for i, r in enumerate(regions)}
        for key, ms in cfg.latency_ms.items():
            a, b = key.split(".")
            self.lat[index[a]][index[b]] = ms
            self.lat[index[b]][index[a]] = ms
        self.cuts: list[Cut] = []
        self.loss_windows: list[tuple[int, int, float]] = []
        self.up: list[bool] = []  # process running
        self.host_up: list[bool] = []  # host reachable (False = blackhole: timeouts, not refusals)
        self.epoch: list[int] = []
        # one connection per unordered pair, keyed lo * stride + hi (an int hashes faster than a tuple)
        self.stride = len(node_region) + 1
        self.conns: dict[int, Conn] = {}
        # per node, its peers in self.conns (a dict, insertion-ordered like self.conns itself)
        self.adj: list[dict[int, None]] = [{} for _ in node_region]
        self.backoff: dict[tuple[int, int], tuple[int, int]] = {}  # (src,dst) -> (until, current)
        self.conn_cap: dict[int, int] = {}  # the chaos drill's fd_pressure: node -> most connections it can hold
        self.bits_per_ms = cfg.bandwidth_mbps * 1000.0
        self.datagram = cfg.transport == "datagram"
        self.mixed = cfg.transport == "mixed"
        self._overhead = tcp.frame_overhead_bytes
        self._mss = tcp.mss
        self._header = tcp.header_bytes

    # -- topology ------------------------------------------------------------------------------------
    def one_way(self, a: int, b: int) -> float:
        return self.lat[self.node_region[a]][self.node_region[b]]

    def loss_at(self, t: int) -> float:
        loss = self.cfg.loss
        for start, end, p in self.loss_windows:
            if start <= t < end:
                loss = max(loss, p)
        return loss

    def reachable(self, a: int, b: int, t: int) -> bool:
        if not self.host_up[a] or not self.host_up[b]:
            return False
        for c in self.cuts:
            if c.start <= t < c.end and c.side[a] != c.side[b]:
                return False
        return True

    def heal_time(self, a: int, b: int, t: int) -> int:
        """First time >= t when the cuts between a and b are all over (hosts assumed up)."""
        for _ in range(16):
            blocking = [c.end for c in self.cuts if c.start <= t < c.end and c.side[a] != c.side[b]]
            if not blocking:
                return t
            t = min(blocking)
        return NEVER

    def _delay(self, a: int, b: int, nbytes: int, t: int) -> int:
        """One message over a live connection: latency, jitter, serialisation, retransmissions."""
        nr = self.node_region
        lat = self.lat[nr[a]][nr[b]]
        rng = self.rng
        d = lat * (1.0 + self.cfg.jitter * rng.random()) + nbytes * 8 / self.bits_per_ms
        loss = self.loss_at(t) if self.loss_windows else self.cfg.loss
        if loss > 0.0:
            tcp = self.tcp
            rtt = 2 * lat
            rto = rtt + tcp.min_rto_ms
            segs = 1 + (nbytes - 1) // tcp.mss
            rack = tcp.recovery == "rack-tlp"
            worst = 0.0
            for k in range(segs):
                if rng.random() < loss:
                    if not rack:
                        first = rto
                    elif k < segs - 1:
                        first = 1.25 * rtt + 1  # RACK: a later segment's ack reveals the loss
                    else:  # tail loss probe
                        first = max(2 * rtt, tcp.tlp_min_ms) + (tcp.delayed_ack_ms if segs == 1 else 0)
                    extra = first
                    step = rto
                    while rng.random() < loss and step < tcp.max_rto_ms:
                        extra += step  # the retransmission was lost too: RTO, doubling
                        step *= 2
                    if extra > worst:
                        worst = extra
            d += worst
        return int(d) + 1

    def wire_bytes(self, payload: int) -> int:
        n = payload + self._overhead
        return n + (1 + (n - 1) // self._mss) * self._header

    # -- connection model ----------------------------------------------------------------------------
    def transmit(self, src: int, dst: int, nbytes: int, t: int,
                 on_connect: Callable[[int, int, int], None],
                 on_break: Callable[[int, int, int], None]) -> tuple[int, int]:
        """Send one message of ``nbytes`` on the wire (see ``wire_bytes``).  Returns (deliver_at,
        fail_at): exactly one is NEVER.  ``on_connect(a, b, at)`` / ``on_break(a, b, at)`` are called
        when a connection opens / breaks."""
        if self.datagram:
            return self._datagram(src, dst, nbytes, t)
        if src < dst:
            lo, hi = src, dst
        else:
            lo, hi = dst, src
        key = lo * self.stride + hi
        conn = self.conns.get(key)
        if conn is not None:
            epoch = self.epoch
            if conn.broken or t >= conn.fail_at or conn.epoch_a != epoch[lo] or conn.epoch_b != epoch[hi]:
                self._forget(key, lo, hi)
                conn = None
        if conn is None:
            bo = self.backoff.get((src, dst))
            if bo is not None and t < bo[0]:
                return NEVER, t
            conn = self._dial(src, dst, lo, hi, key, t, on_connect)
        if conn.ready_at == NEVER and conn.fail_at != NEVER:
            return NEVER, conn.fail_at  # dialling, will fail
        start = conn.ready_at if conn.ready_at > t else t
        if (not self.up[dst] or not self.host_up[src] or not self.host_up[dst]
                or (self.cuts and not self._uncut(src, dst, start))):
            return self._broken(conn, src, dst, start, on_break)
        return self._order(conn, src, dst, start + self._delay(src, dst, nbytes, start)), NEVER

    def datagram_path(self, src: int, dst: int, t: int) -> bool:
        """``mixed``: src and dst have a live connection and src's datagram path to dst is up."""
        lo, hi = (src, dst) if src < dst else (dst, src)
        conn = self.conns.get(lo * self.stride + hi)
        if (conn is None or conn.broken or t >= conn.fail_at or conn.ready_at > t
                or conn.epoch_a != self.epoch[lo] or conn.epoch_b != self.epoch[hi]):
            return False
        return (conn.dgram_lo if src == lo else conn.dgram_hi) <= t

    def _uncut(self, a: int, b: int, t: int) -> bool:
        for c in self.cuts:
            if c.start <= t < c.end and c.side[a] != c.side[b]:
                return False
        return True

    def _broken(self, conn: Conn, src: int, dst: int, start: int,
                on_break: Callable[[int, int, int], None]) -> tuple[int, int]:
        """The peer is unreachable or gone when the message would leave: it is retransmitted until
        the path heals (then delivered) or the connection breaks."""
        if self.up[dst] or not self.host_up[dst]:
            heal = self.heal_time(src, dst, start) if self.host_up[src] and self.host_up[dst] else NEVER
            rto = 2 * self.one_way(src, dst) + self.tcp.min_rto_ms
            t_retx, step = start + rto, rto
            while t_retx < heal and t_retx - start < self.tcp.user_timeout_ms:
                step = min(step * 2, self.tcp.max_rto_ms)
                t_retx += step
            if t_retx >= heal and t_retx - start < self.tcp.user_timeout_ms and self.up[dst]:
                at = int(t_retx + self.one_way(src, dst)) + 1
                return self._order(conn, src, dst, at), NEVER
            brk = start + self.tcp.user_timeout_ms
        else:
            brk = start + int(2 * self.one_way(src, dst)) + 1  # process gone: RST
        conn.fail_at = min(conn.fail_at, brk)
        conn.broken = True
        on_break(src, dst, brk)
        return NEVER, NEVER  # lost with the connection; the break is reported

    def _order(self, conn: Conn, src: int, dst: int, at: int) -> int:
        if src < dst:
            if at <= conn.last_ab:
                at = conn.last_ab
            conn.last_ab = at
        else:
            if at <= conn.last_ba:
                at = conn.last_ba
            conn.last_ba = at
        return at

    def _remember(self, key: int, lo: int, hi: int, conn: Conn) -> None:
        self.conns[key] = conn
        self.adj[lo][hi] = None
        self.adj[hi][lo] = None

    def _forget(self, key: int, lo: int, hi: int) -> Conn | None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            del self.adj[lo][hi]
            del self.adj[hi][lo]
        return conn

    def _dial(self, src: int, dst: int, lo: int, hi: int, key: int, t: int,
              on_connect: Callable[[int, int, int], None]) -> Conn:
        ea, eb = self.epoch[lo], self.epoch[hi]
        rtt = 2 * self.one_way(src, dst)
        capped = bool(self.conn_cap) and (len(self.adj[src]) >= self.conn_cap.get(src, 1 << 30)
                                          or len(self.adj[dst]) >= self.conn_cap.get(dst, 1 << 30))
        if self.reachable(src, dst, t) and self.up[dst] and not capped:
            setup = self.tcp.connect_rtts * rtt
            loss = self.loss_at(t)
            if loss > 0.0:
                for i in range(int(2 * self.tcp.connect_rtts + 0.5)):
                    if self.rng.random() < loss:
                        setup += self.tcp.syn_rto_ms if i < 2 else rtt + self.tcp.min_rto_ms
            ready = t + int(setup) + 1
            conn = Conn(ready, ea, eb, ready, ready)
            if self.mixed:
                up_src, up_dst = probe_up_at(self, src, dst, ready)
                conn.dgram_lo, conn.dgram_hi = (up_src, up_dst) if src == lo else (up_dst, up_src)
            self._remember(key, lo, hi, conn)
            self.backoff.pop((src, dst), None)
            on_connect(src, dst, ready)
            return conn
        if self.host_up[dst] and self.reachable(src, dst, t):
            fail = t + int(rtt) + 1  # refused: the host answers with RST
        else:
            fail = t + self.tcp.connect_timeout_ms
        _, cur = self.backoff.get((src, dst), (0, 0))
        cur = min(max(self.tcp.reconnect_backoff_ms, cur * 2), self.tcp.reconnect_backoff_max_ms)
        self.backoff[(src, dst)] = (fail + cur, cur)
        conn = Conn(NEVER, ea, eb, fail_at=fail)
        self._remember(key, lo, hi, conn)
        return conn

    def close(self, a: int, b: int) -> bool:
        lo, hi = (a, b) if a < b else (b, a)
        return self._forget(lo * self.stride + hi, lo, hi) is not None

    def drop_node(self, i: int) -> list[int]:
        """The process of node i ended: its connections are gone.  Returns the peers it had (in the
        order their connections were made), O(its connections), not O(all connections)."""
        peers = []
        for j in list(self.adj[i]):
            lo, hi = (i, j) if i < j else (j, i)
            conn = self._forget(lo * self.stride + hi, lo, hi)
            assert conn is not None
            if conn.ready_at != NEVER and not conn.broken:
                peers.append(j)
        return peers

    def _datagram(self, src: int, dst: int, nbytes: int, t: int) -> tuple[int, int]:
        rng = self.rng
        if not self.reachable(src, dst, t) or not self.up[dst] or rng.random() < self.loss_at(t):
            return NEVER, NEVER
        lat = self.one_way(src, dst)
        d = lat * (1.0 + self.cfg.jitter * rng.random()) + nbytes * 8 / self.bits_per_ms
        if self.cfg.reorder and rng.random() < self.cfg.reorder:
            d += rng.random() * self.cfg.reorder_ms
        return t + int(d) + 1, NEVER

    def duplicate_delay(self, src: int, dst: int) -> int | None:
        """Datagram mode: a duplicate copy of the last message, if the dice say so."""
        if self.cfg.transport != "datagram" or not self.cfg.duplicate or self.rng.random() >= self.cfg.duplicate:
            return None
        return int(self.one_way(src, dst) + self.rng.random() * max(self.cfg.reorder_ms, 1)) + 1
