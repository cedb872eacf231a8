"""The real drill's fault actions (``RealDrill`` mixes them in): each episode of ``schedule.plan`` put on
the drill's timeline, and what each does to the lab: drop rules in the drill's own table, kill -9 and
restarts on the same state directory, a full tmpfs, a restart under libfaketime, ``nft flush ruleset``,
``prlimit``.  Every action returns a short note for the fault timeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import netfaults as nf
from .checks import SAMPLE_MS
from .schedule import Episode

if TYPE_CHECKING:
    from .checks import DrillChecks
    from .nodes import RealNode



class FaultActions:
    """Mixed into ``RealDrill``: what it needs from it is declared here."""

    n: int
    ids: list[str]
    sc: Any
    lab: Any
    checks: DrillChecks
    tables: list[nf.DrillTable]
    fillers: dict[int, nf.DiskFiller]
    cuts: list[tuple[set[int], set[int]]]
    loss_windows: list[float]
    blackholed: set[int]
    authority_down: int
    deferred: list[int]
    fd_saved: dict[int, tuple[int, tuple[int, int]]]
    history: list[list[tuple[int, bool, int, int | None]]]
    kills: int
    restarts: int

    def at(self, ms: int, label: str, fn: Callable[[], Any]) -> None:
        raise NotImplementedError  # RealDrill's

    def node(self, i: int) -> RealNode:
        raise NotImplementedError  # RealDrill's

    def now_ms(self) -> int:
        raise NotImplementedError  # RealDrill's

    def _publish(self, serial: int) -> str:
        raise NotImplementedError  # RealDrill's

    def _schedule_episode(self, e: Episode) -> None:
        nodes = list(e.nodes)
        end = e.end_ms
        if e.kind == "partition":
            inside, outside = set(nodes), set(range(self.n)) - set(nodes)
            cut = (inside, outside)
            self.at(e.start_ms, f"partition {e.name}", lambda: self._cut(cut, True))
            if end is not None:
                self.at(end, f"heal {e.name}", lambda: self._cut(cut, False))
        elif e.kind in ("region_outage", "crash", "kill9") and nodes:
            blackhole = e.kind == "region_outage"
            self.at(e.start_ms, f"{e.kind} {e.name}", lambda: self._down(nodes, blackhole))
            if end is not None:
                self.at(end, f"restart {e.name}", lambda: self._up(nodes))
        elif e.kind == "authority_outage":
            self.at(e.start_ms, "authority down", self._authority_down)
            if end is not None:
                self.at(end, "authority up", self._authority_up)
        elif e.kind == "loss":
            p = float(e.detail["loss"])
            self.at(e.start_ms, f"loss {p}", lambda: self._loss(p, True))
            if end is not None:
                self.at(end, f"loss {p} ends", lambda: self._loss(p, False))
        elif e.kind == "disk_full":
            self.at(e.start_ms, f"disk full {e.name}", lambda: self._disk(nodes, True))
            self.at(end or self.sc.duration_ms, f"disk freed {e.name}", lambda: self._disk(nodes, False))
        elif e.kind == "clock_skew":
            skew = float(e.detail["skew_s"])
            self.at(e.start_ms, f"clock skew {skew:+.0f} s", lambda: self._restart_skewed(nodes, skew))
            if end is not None:
                self.at(end, "clock skew ends", lambda: self._restart_skewed(nodes, 0.0))
        elif e.kind == "flush_ruleset":
            self.at(e.start_ms, f"nft flush ruleset {e.name}", lambda: self._flush(nodes))
        elif e.kind == "fd_pressure":
            nofile = int(e.detail["nofile"])
            self.at(e.start_ms, f"RLIMIT_NOFILE {nofile}", lambda: self._nofile(nodes, nofile))
            if end is not None:
                self.at(end, "RLIMIT_NOFILE restored", lambda: self._nofile(nodes, None))

    def _cut(self, cut: tuple[set[int], set[int]], on: bool) -> str:
        if on:
            self.cuts.append(cut)
        else:
            self.cuts.remove(cut)
        self._refresh_tables()
        return ""

    def _loss(self, p: float, on: bool) -> str:
        if on:
            self.loss_windows.append(p)
        else:
            self.loss_windows.remove(p)
        self._refresh_tables()
        return ""

    def _disk(self, nodes: list[int], full: bool) -> str:
        for i in nodes:
            if full:
                self.fillers[i].fill()
            else:
                self.fillers[i].empty()
        return ", ".join(self.ids[i] for i in nodes)

    def _authority_down(self) -> str:
        self.authority_down += 1
        return ""

    def _authority_up(self) -> str:
        self.authority_down -= 1
        if self.authority_down:
            return ""
        pending, self.deferred = self.deferred, []
        return "; ".join(f"serial {s}: {self._publish(s)}" for s in pending)

    def _down(self, nodes: list[int], blackhole: bool) -> str:
        killed = []
        for i in nodes:
            node = self.node(i)
            if node.alive:
                node.kill9()
                self.kills += 1
                killed.append(self.ids[i])
            if blackhole:
                self.blackholed.add(i)
        if blackhole:
            self._refresh_tables()
        return f"kill -9 {', '.join(killed)}" if killed else "skipped: already down"

    def _up(self, nodes: list[int]) -> str:
        started = []
        for i in nodes:
            self.blackholed.discard(i)
        self._refresh_tables()
        for i in nodes:
            node = self.node(i)
            if not node.alive:
                node.start()
                self.restarts += 1
                started.append(self.ids[i])
        return f"started {', '.join(started)}" if started else "already running"

    def _restart_skewed(self, nodes: list[int], skew: float) -> str:
        for i in nodes:
            node = self.node(i)
            node.stop()
            node.skew_s = skew
            node.start()
            self.restarts += 1
        return f"{', '.join(self.ids[i] for i in nodes)} restarted with clock {skew:+.0f} s"

    def _flush(self, nodes: list[int]) -> str:
        for i in nodes:
            if not self._serving(i):  # down or still booting: its boot apply restores the table, no drift alert
                self.checks.no_alert_expected(self.now_ms(), i)
            nf.run(["ip", "netns", "exec", self.lab.ns(i), "nft", "flush", "ruleset"])
            self.tables[i].load()  # the flush took the drill's own table too
        return ", ".join(self.ids[i] for i in nodes)

    def _nofile(self, nodes: list[int], nofile: int | None) -> str:
        out = []
        for i in nodes:
            node = self.node(i)
            if not node.alive or node.proc is None:
                continue
            pid = node.proc.pid
            if nofile is not None:
                self.fd_saved[i] = (pid, nf.get_nofile(pid))
                nf.set_nofile(pid, nofile, self.fd_saved[i][1][1])
                out.append(f"{self.ids[i]} pid {pid} nofile {nofile}")
            elif i in self.fd_saved and self.fd_saved[i][0] == pid:
                soft, hard = self.fd_saved.pop(i)[1]
                nf.set_nofile(pid, soft, hard)
                out.append(f"{self.ids[i]} nofile {soft}")
        return "; ".join(out) or "no running process"

    def _serving(self, i: int) -> bool:
        h = self.history[i]
        return self.node(i).alive and bool(h) and h[-1][1] and self.now_ms() - h[-1][0] < 2 * SAMPLE_MS

    def _refresh_tables(self) -> None:
        base = self.sc.network.loss
        loss = max([base, *self.loss_windows])
        for i, table in enumerate(self.tables):
            cut: set[str] = set()
            for inside, outside in self.cuts:
                other = outside if i in inside else inside if i in outside else set()
                cut |= {self.lab.ip(j) for j in other}
            new = (int(round(loss * 100)), cut, i in self.blackholed)
            if (table.loss_pct, table.cut, table.blackhole) != new or not getattr(table, "loaded", False):
                table.loss_pct, table.cut, table.blackhole = new
                table.load()
                table.loaded = True  # type: ignore[attr-defined]

