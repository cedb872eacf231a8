"""The simulator kernel: one event loop that drives processes over a virtual clock.

A process is anything with ``handle(now, input) -> effects`` and ``next_deadline()`` (``Process``):
the real ``protocol.gossip.node.Node``, the hostile node wrapping it, and the baselines.  The kernel keeps a
heap of events ``(at_ms << SEQ_BITS | seq, node, epoch, input)``: one int key orders by time, then by
push order; the heap holds the int keys only (an int compare per heap step, not a tuple compare) and a
dict maps each key to its ``(node, epoch, input)``; ``input`` is what the node is fed (``FrameReceived``, ``PeerConnected``, ``TimerFired``...)
or an ``Action`` the simulation itself runs at that time (boot, crash, publish, sample).  ``epoch``
is the node's restart count when the event was sent: an event for an earlier life of the node is
dropped.  Each node has at most one live timer (its ``next_deadline()``); the time is integer
milliseconds and the wall clock is ``T0 + ms / 1000`` plus the node's clock skew.

The kernel does not know what an effect means: after each ``handle`` it passes the effects to the
``execute`` callback it was given (``simulations.effects``), and each delivered frame to ``on_frame``
(the measurement).  The network model (``simulations.network``) or the perfect link
(``simulations.fakelink``) decides when the events they push arrive.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.gossip import FrameReceived, Now, TimerFired

from .identities import T0

SEQ_BITS = 40  # heap key = at_ms << SEQ_BITS | seq: one int compare per heap step, not a tuple compare
TIMER_FIRED = TimerFired()  # frozen, no fields: one instance serves every timer


class Process(Protocol):
    """What the kernel drives: ``protocol.gossip.node.Node``, ``HostileNode``, the baselines."""

    def handle(self, now: Now, inp: Any) -> list[Any]: ...

    def next_deadline(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Action:
    """A simulator-side event: ``run(node, arg)`` at its time (counted as an event even if it does
    nothing)."""

    run: Callable[[int, Any], None]
    arg: Any = None


class Kernel:
    """Processes by index, which of them are up, their restart epochs and timers, and the heap."""

    def __init__(self, nodes: int, execute: Callable[[int, list[Any]], None],
                 on_frame: Callable[[int, bytes], None] | None = None) -> None:
        self.heap: list[int] = []  # event keys: at_ms << SEQ_BITS | seq (unique)
        self.pending: dict[int, tuple[int, int, Any]] = {}  # event key -> (node, epoch, input)
        self._next_seq = itertools.count(1).__next__
        self.now = 0
        self.events = 0
        self.procs: list[Process | None] = [None] * nodes
        self.up = [False] * nodes  # the process is running
        self.epoch = [0] * nodes  # restarts so far
        self.skew_s = [0.0] * nodes  # wall-clock skew
        self.timer_at: list[int | None] = [None] * nodes
        self.execute = execute
        self.on_frame = on_frame
        self._now_obj = Now(-(1 << 62), 0.0)  # the last Now handed out, reused for the same ms and skew
        self._now_skew = 0.0

    def add_node(self) -> int:
        """One more node slot (down, no process yet); returns its index."""
        self.procs.append(None)
        self.up.append(False)
        self.epoch.append(0)
        self.skew_s.append(0.0)
        self.timer_at.append(None)
        return len(self.procs) - 1

    def push(self, at: int, node: int, inp: Any, epoch: int = 0) -> None:
        """Feed ``inp`` to ``node`` at ``at`` if the node is still up in the same ``epoch``."""
        key = (at << SEQ_BITS) | self._next_seq()
        self.pending[key] = (node, epoch, inp)
        heapq.heappush(self.heap, key)

    def schedule(self, at: int, run: Callable[[int, Any], None], node: int = 0, arg: Any = None) -> None:
        key = (at << SEQ_BITS) | self._next_seq()
        self.pending[key] = (node, 0, Action(run, arg))
        heapq.heappush(self.heap, key)

    def wall(self, node: int, ms: int) -> float:
        return T0 + ms / 1000.0 + self.skew_s[node]

    def start(self, node: int, proc: Process) -> None:
        """The process of ``node`` starts now (a boot or a restart): it gets a first timer."""
        self.procs[node] = proc
        self.up[node] = True
        self.feed(node, TimerFired())

    def stop(self, node: int) -> None:
        """The process of ``node`` ended: its pending events and timer are dropped."""
        self.procs[node] = None
        self.up[node] = False
        self.timer_at[node] = None

    def feed(self, i: int, inp: Any) -> list[Any]:
        """Hand one input to node ``i`` now, execute its effects, re-arm its timer."""
        proc = self.procs[i]
        if proc is None or not self.up[i]:
            return []
        now = self.now
        nw = self._now_obj
        skew = self.skew_s[i]
        if nw.ms != now or self._now_skew != skew:  # Now is frozen: nodes may share one
            nw = self._now_obj = Now(now, T0 + now / 1000.0 + skew)  # == Now(now, self.wall(i, now))
            self._now_skew = skew
        effects = proc.handle(nw, inp)
        if effects:
            self.execute(i, effects)
        d = proc.next_deadline()
        if d is not None:
            if d < now:
                d = now
            if self.timer_at[i] != d:
                self.timer_at[i] = d
                key = (d << SEQ_BITS) | self._next_seq()
                self.pending[key] = (i, 0, TIMER_FIRED)
                heapq.heappush(self.heap, key)
        return effects

    def run_until(self, end: int, tick: Callable[[int], None] | None = None) -> None:
        """Process every event up to ``end`` ms (inclusive); ``tick(at)`` sees each event's time."""
        heap = self.heap
        pop = heapq.heappop
        take = self.pending.pop
        up, epoch, timer_at = self.up, self.epoch, self.timer_at
        on_frame = self.on_frame
        feed = self.feed
        events = self.events
        while heap:
            if heap[0] >> SEQ_BITS > end:
                break
            key = pop(heap)
            i, ep, inp = take(key)
            at = key >> SEQ_BITS
            self.now = at
            if tick is not None:
                tick(at)
            if inp is TIMER_FIRED:
                if timer_at[i] != at or not up[i]:
                    continue
                timer_at[i] = None
            elif type(inp) is Action:
                events += 1
                inp.run(i, inp.arg)
                continue
            else:
                if not up[i] or epoch[i] != ep:
                    continue
                if on_frame is not None and type(inp) is FrameReceived:
                    on_frame(i, inp.data)
            events += 1
            feed(i, inp)
        self.events = events
        if end > self.now:
            self.now = end
