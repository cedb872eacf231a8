"""The ``World`` of ``simulations.effects`` around the simulated hosts: what a node's effects reach.

Sends go through the network model (``simulations.network``; with ``transport = "mixed"``, small
dissemination messages between connected peers as datagrams, ``simulations.datagrams``) and arrive as
``FrameReceived`` after the per-message processing time, or come back as ``SendFailed``; connections opening and breaking
reach both ends as ``PeerConnected`` / ``PeerDisconnected``.  The ``Enforce`` of a newly accepted
policy goes to the enforcer model: it confirms what it loaded after ``apply_ms`` (``RulesetApplied``).
The observers hear of the rest: the invariants (every ``Enforce``'s members, the effects of an
apply), the measurement (applies, detections, alerts) and the chaos drill (applies, failed writes).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocol.channel.datagram_policy import MAX_FRAME, datagram_worthy, is_body, sent_size
from protocol.gossip import (
    Alert,
    Enforce,
    FrameReceived,
    LivenessChanged,
    PeerConnected,
    PeerDisconnected,
    RulesetApplied,
    Send,
    SendFailed,
)
from protocol.trust import Certificate

from .datagrams import datagram_plan
from .network import NEVER
from .wire import frame_kind

if TYPE_CHECKING:
    from .context import SimState
    from .drill.simfaults import SimDrill
    from .measure import Measurement


BODY_TAGS = (7, 9)  # PolicyPush, RootPush (protocol.gossip.wire): verified, stored and forwarded


class SimWorld:
    def __init__(self, sim: SimState, measure: Measurement, drill: SimDrill, by_addr: dict[str, int], cert_of: list[bytes],
                 hostile_idx: frozenset[int], process_ms: int) -> None:
        self.sc, self.seed, self.n = sim.sc, sim.seed, sim.n
        self.kernel, self.net, self.hosts = sim.kernel, sim.net, sim.hosts
        self.ids, self.by_id, self.by_addr, self.cert_of = sim.ids, sim.by_id, by_addr, cert_of
        self.inv, self.measure, self.drill = sim.inv, measure, drill
        self.hostile_idx = hostile_idx
        self.process_ms = process_ms
        self.bodies_to_hostile = 0  # policy bodies honest nodes sent to hostile ones (flood: pulls)
        # [nodes] host_cores > 0: every node shares that many cores (float ms when each is free next)
        self.host_cores = sim.sc.nodes.host_cores
        self.cores = [0.0] * self.host_cores
        self.node_free: dict[int, float] = {}
        # transport = "mixed": messages sent as datagrams, datagrams sent (retransmissions included),
        # acks sent, retransmissions, messages that went on the stream after unanswered tries
        self.datagram_counts = {"messages": 0, "sent": 0, "acks": 0, "retransmits": 0, "fallbacks": 0}
        self._sent_sizes: dict[bytes, int] = {}  # a body's size as datagrams (compressed), per body

    # -- the enforcer model -------------------------------------------------------------------------
    def apply_policy(self, i: int, eff: Enforce, effects: list[Any]) -> None:
        if i >= self.n:
            return
        h = self.hosts[i]
        kernel = self.kernel
        serial = eff.policy.serial
        done = kernel.now
        apply_cpu = self.sc.nodes.apply_cpu_ms
        if self.host_cores and apply_cpu is not None:
            # the apply runs on the host's cores after the message that accepted the version (whose
            # pushes are already out): the node is busy, and the version applied, when it is done
            done = math.ceil(self._charge(i, apply_cpu))
        if self.sc.protocol == "gossip":
            # the enforcer confirms what it loaded after apply_ms (RulesetApplied)
            kernel.schedule(done + self.sc.nodes.apply_ms, self._confirm, i,
                            (kernel.epoch[i], serial, eff.policy_hash))
        if not h.hostile:
            h.applied = self.inv.check_effects(self.seed, kernel.now, h.node_id, h.applied, effects)
            self.drill.applied(i, h.applied)
        else:
            h.applied = max(h.applied, serial)
        if done > kernel.now:
            kernel.schedule(done, self._converged, i, kernel.epoch[i])
        else:
            self.measure.converged(h)

    def _converged(self, i: int, epoch: int) -> None:
        if self.net.up[i] and self.net.epoch[i] == epoch:
            self.measure.converged(self.hosts[i])

    def _confirm(self, i: int, arg: tuple[int, int, str]) -> None:
        epoch, serial, policy_hash = arg
        if self.net.up[i] and self.net.epoch[i] == epoch:
            self.kernel.feed(i, RulesetApplied(serial, "", policy_hash))

    # -- the wire ------------------------------------------------------------------------------------
    def send(self, i: int, eff: Send) -> None:
        kernel, net = self.kernel, self.net
        now, epoch = kernel.now, net.epoch
        peer = eff.peer
        j = self.by_id.get(peer) if peer else self.by_addr.get(eff.address)
        if j is None:
            kernel.push(now + self.sc.tcp.connect_timeout_ms, i, SendFailed(peer, eff.address), epoch[i])
            return
        if j == i:
            return
        data = eff.data
        if j in self.hostile_idx and i not in self.hostile_idx and len(data) > 1 and data[1] == 7:
            self.bodies_to_hostile += 1
        if net.mixed and datagram_worthy(data) and net.datagram_path(i, j, now):
            self._send_datagrams(i, j, eff)
            return
        self._stream(i, j, eff.peer, eff.address, data)

    def _stream(self, i: int, j: int, peer: str, address: str, data: bytes) -> None:
        kernel, net = self.kernel, self.net
        now, epoch = kernel.now, net.epoch
        deliver, fail = net.transmit(i, j, net.wire_bytes(len(data)), now, self._on_connect, self._on_break)
        if deliver != NEVER:
            frame = FrameReceived(self.ids[i], data)
            if self.host_cores:
                kernel.schedule(deliver, self._host_cpu, j, (epoch[j], frame, False))
            else:
                kernel.push(deliver + self.process_ms, j, frame, epoch[j])
            deliver += self.process_ms
            if net.datagram:
                dup = net.duplicate_delay(i, j)
                if dup is not None:
                    kernel.push(deliver + dup, j, frame, epoch[j])
        elif fail != NEVER:
            kernel.push(fail, i, SendFailed(peer, address), epoch[i])

    # -- datagrams (transport = "mixed") -------------------------------------------------------------
    def _sent_size(self, data: bytes) -> int:
        """What a message takes as datagrams: compressed when that saves datagrams, as the daemon sends it
        (compressed once per body: the same body goes to many peers)."""
        if len(data) <= MAX_FRAME:
            return len(data)
        size = self._sent_sizes.get(data)
        if size is None:
            if len(self._sent_sizes) >= 256:
                self._sent_sizes.clear()
            size = self._sent_sizes[data] = sent_size(data)
        return size

    def _send_datagrams(self, i: int, j: int, eff: Send) -> None:
        kernel, net = self.kernel, self.net
        data = eff.data
        plan = datagram_plan(net, i, j, self._sent_size(data), kernel.now, is_body(data))
        kind = frame_kind(data)
        counts = self.datagram_counts
        counts["messages"] += 1
        counts["sent"] += plan.sends
        counts["acks"] += plan.acks
        counts["retransmits"] += plan.sends - plan.fragments
        counts["fallbacks"] += plan.fallback_at != NEVER
        for at, node, nbytes in plan.arrivals:
            kernel.schedule(at, self._datagram_arrived, node, (net.epoch[node], nbytes, kind))
        if plan.deliver_at != NEVER:
            frame = FrameReceived(self.ids[i], data)
            if self.host_cores:
                kernel.schedule(plan.deliver_at, self._host_cpu, j, (net.epoch[j], frame, True))
            else:
                kernel.schedule(plan.deliver_at + self.process_ms, self._datagram_delivered, j, (net.epoch[j], frame))
        if plan.fallback_at != NEVER:  # some datagram was never acknowledged: the whole message on the stream
            kernel.schedule(plan.fallback_at, self._datagram_fallback, i, (net.epoch[i], j, eff))

    def _datagram_arrived(self, node: int, arg: tuple[int, int, int]) -> None:
        epoch, nbytes, kind = arg
        if self.net.up[node] and self.net.epoch[node] == epoch:
            self.measure.datagram_bytes(node, nbytes, kind)

    def _datagram_delivered(self, j: int, arg: tuple[int, FrameReceived]) -> None:
        epoch, frame = arg
        if self.net.up[j] and self.net.epoch[j] == epoch:
            self.measure.datagram_message(j, frame.data)
            self.kernel.feed(j, frame)

    # -- one host's cores ([nodes] host_cores) ------------------------------------------------------
    def _host_cpu(self, j: int, arg: tuple[int, FrameReceived, bool]) -> None:
        """A message arrived at node j: it is handled after ``process_ms`` of CPU (a policy or root body:
        ``body_process_ms``) on one of the host's cores, once node j (one event loop) and a core are free,
        in order of arrival."""
        epoch, frame, datagram = arg
        if not self.net.up[j] or self.net.epoch[j] != epoch:
            return
        now = self.kernel.now
        nodes = self.sc.nodes
        data = frame.data
        body = nodes.body_process_ms is not None and len(data) > 1 and data[1] in BODY_TAGS
        done = self._charge(j, nodes.body_process_ms if body else nodes.process_ms)  # type: ignore[arg-type]
        at = max(now, math.ceil(done))
        if datagram:
            self.kernel.schedule(at, self._datagram_delivered, j, (epoch, frame))
        else:
            self.kernel.push(at, j, frame, epoch)

    def _charge(self, j: int, cost_ms: float) -> float:
        """``cost_ms`` of CPU for node j on the first free core, once its event loop is free: when done."""
        core = heapq.heappop(self.cores)
        done = max(float(self.kernel.now), core, self.node_free.get(j, 0.0)) + cost_ms
        heapq.heappush(self.cores, done)
        self.node_free[j] = done
        return done

    def _datagram_fallback(self, i: int, arg: tuple[int, int, Send]) -> None:
        epoch, j, eff = arg
        if self.net.up[i] and self.net.epoch[i] == epoch:
            self._stream(i, j, eff.peer, eff.address, eff.data)

    def disconnect(self, i: int, peer: str) -> None:
        j = self.by_id.get(peer)
        net = self.net
        if j is not None and net.close(i, j):
            now = self.kernel.now
            self.kernel.push(now + int(net.one_way(i, j)) + 1, j, PeerDisconnected(self.ids[i]), net.epoch[j])
            self.kernel.push(now, i, PeerDisconnected(self.ids[j]), net.epoch[i])

    # -- the observers -------------------------------------------------------------------------------
    def directory_changed(self, i: int, before: Mapping[str, Certificate] | None,
                          after: Mapping[str, Certificate]) -> None:
        self.inv.check_directory(self.seed, self.kernel.now, self.ids[i], before, after)

    def liveness_changed(self, i: int, eff: LivenessChanged) -> None:
        if eff.liveness in ("dead", "suspect"):
            self.measure.detection(i, eff)

    def alert(self, i: int, eff: Alert) -> None:
        self.measure.alert(eff)

    def write_failed(self, i: int) -> None:
        self.drill.write_failed(i)

    def _on_connect(self, a: int, b: int, at: int) -> None:
        epoch = self.net.epoch
        self.kernel.push(at, a, PeerConnected(self.ids[b], self.cert_of[b]), epoch[a])
        self.kernel.push(at, b, PeerConnected(self.ids[a], self.cert_of[a]), epoch[b])

    def _on_break(self, a: int, b: int, at: int) -> None:
        epoch = self.net.epoch
        self.kernel.push(at, a, PeerDisconnected(self.ids[b]), epoch[a])
        self.kernel.push(at, b, PeerDisconnected(self.ids[a]), epoch[b])
