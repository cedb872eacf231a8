"""``meshsim run SCENARIO --real``: the scenario on real ``meshnode`` processes (root only).

One network namespace per node on a bridge (``meshnode.demo_netns.NetnsLab``, prefix ``pmdrill``,
subnet 10.214.0.0/24), real nftables enforcement, the faults of ``schedule.plan`` executed for real on
the wall clock: loss, partitions and blackholes in the drill's own nftables table
(``netfaults.DrillTable``), crashes as ``kill -9`` and restarts on the same state directory, a full disk
as a filled tmpfs on the state directory, clock skew as a restart under libfaketime, a foreign ``nft flush
ruleset``, descriptor pressure as ``prlimit``.  Publishes go through ``meshctl policy publish``.

Before the timeline starts every node enforces serial 1 (the simulator's nodes are enrolled with it);
the scenario's ``publish_at_ms`` are serials 2, 3, ...  A sampler thread per node, inside its namespace,
reads ``/v1/status`` and the kernel's table every ``SAMPLE_MS`` and feeds ``checks.DrillChecks``;
``nft monitor`` reports gaps between samples; the alert webhook reports every trigger and resolve.

What the kernel cannot do here: delay (no ``tc netem``), so latency is not emulated (the report says
so); duplication and reordering neither.
"""

from __future__ import annotations

import heapq
import itertools
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnode.authority_store import CliError
from meshnode.demo_netns import NetnsLab
from meshnode.enforce.backend import EnforcementError
from meshnode.enforce.nft_backend import NftBackend

from ..scenario import Scenario
from . import netfaults as nf
from .checks import SAMPLE_MS, DrillChecks, Sample
from .nodes import RealCluster, RealNode, admin_status
from .policydoc import document_toml
from .realfaults import FaultActions
from .realreport import real_report
from .schedule import last_heal_ms, plan, print_schedule

DEFAULT_MAX_NODES = 8  # the scenario's count, capped (2 cores: 8 daemons plus their samplers)
MAX_NODES = 200  # addresses 10.214.0.10 .. 209
BOOT_TIMEOUT_S = 60.0
PUBLISH_ATTEMPTS = 3
SUBNET = "10.214.0"
Hook = tuple[int, Callable[["RealDrill"], None]]


class DrillError(Exception):
    """The real drill cannot run here (one line)."""


def preflight(sc: Scenario) -> None:
    import os

    if os.geteuid() != 0:
        raise DrillError("--real needs root (network namespaces, nftables, tmpfs mounts)")
    need = {"ip": "iproute2", "nft": "nftables", "prlimit": "util-linux", "mount": "mount"}
    if any(f.kind == "clock_skew" for f in sc.faults):
        need["faketime"] = "faketime"
    missing = [f"{tool} ({pkg})" for tool, pkg in need.items() if shutil.which(tool) is None]
    if missing:
        raise DrillError(f"--real needs {', '.join(missing)}: run deploy/dev.sh as root, or apt-get install them")


class RealDrill(FaultActions):
    def __init__(self, sc: Scenario, nodes: int | None = None, progress: bool = True,
                 hooks: tuple[Hook, ...] = (), keep_dir: bool = False) -> None:
        preflight(sc)
        self.sc = sc
        self.n = nodes or min(sc.nodes.count, DEFAULT_MAX_NODES)
        if self.n > MAX_NODES:
            raise DrillError(f"--real runs at most {MAX_NODES} nodes (one namespace and daemon each), not {self.n}")
        self.regions = list(sc.nodes.regions)
        self.episodes = plan(sc, self.n)
        self.ids = [f"n{i:05d}" for i in range(self.n)]
        self.checks = DrillChecks(self.ids, self.episodes, sc.seed)
        self.progress = progress
        self.hooks = hooks
        self.keep_dir = keep_dir
        self.t0: float | None = None
        self.timeline: list[dict[str, Any]] = []
        # per node: (ms, up, serial, ms the node says it applied that serial: enforcement.applied_at)
        self.history: list[list[tuple[int, bool, int, int | None]]] = [[] for _ in range(self.n)]
        self.wall0 = 0.0
        self.latest: list[dict[str, Any] | None] = [None] * self.n
        self.published: dict[int, int] = {}  # serial -> ms
        self.alert_counts: dict[str, int] = {}
        self.kills = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._heap: list[tuple[int, int, str, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self.blackholed: set[int] = set()
        self.cuts: list[tuple[set[int], set[int]]] = []
        self.loss_windows: list[float] = []
        self.authority_down = 0
        self.deferred: list[int] = []
        self.fd_saved: dict[int, tuple[int, tuple[int, int]]] = {}
        self.publisher_rng = random.Random(f"{sc.seed}:publisher")  # drawn as the simulator draws it
        self.publishers: list[threading.Thread] = []
        self.retry_rng = random.Random(f"{sc.seed}:publish-retry")
        self.act_lock = threading.RLock()  # one fault action at a time (the timeline, the publish threads)

    # -- time ---------------------------------------------------------------------------------------
    def now_ms(self) -> int:
        return 0 if self.t0 is None else int((time.monotonic() - self.t0) * 1000)

    def say(self, text: str) -> None:
        if self.progress:
            sys.stderr.write(f"[{self.now_ms() / 1000:7.1f} s] {text}\n")
            sys.stderr.flush()

    def at(self, ms: int, label: str, fn: Callable[[], Any]) -> None:
        with self.act_lock:
            heapq.heappush(self._heap, (ms, next(self._seq), label, fn))

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        wall0 = time.perf_counter()
        print_schedule(self.episodes, self.ids, self.sc.seed, sys.stderr.write)
        self.root = Path(tempfile.mkdtemp(prefix="meshsim-drill-"))
        try:
            self.lab = NetnsLab(self.n, prefix="pmdrill", bridge_prefix="pmdrb", veth_prefix="pmk", subnet=SUBNET,
                                what="meshsim run --real")
        except CliError as exc:
            raise DrillError(str(exc)) from None
        self.fillers: dict[int, nf.DiskFiller] = {}
        self.watches: list[nf.KernelWatch] = []
        self.receiver: nf.AlertReceiver | None = None
        self.cluster: RealCluster | None = None
        threads: list[threading.Thread] = []
        try:
            self._setup()
            threads = [threading.Thread(target=self._sampler, args=(i,), name=f"sampler-{i}", daemon=True)
                       for i in range(self.n)]
            for t in threads:
                t.start()
            self._bootstrap()
            self._schedule()
            self.t0, self.wall0 = time.monotonic(), time.time()
            self.watches = [nf.KernelWatch(self.lab.ns(i), self.now_ms, self._gap_reporter(i)) for i in range(self.n)]
            self._run_timeline()
            return self._finish(time.perf_counter() - wall0)
        finally:
            self._stop.set()
            for t in threads:
                t.join(5)
            self._teardown()

    def _setup(self) -> None:
        sc = self.sc
        self.lab.setup()
        self.receiver = nf.AlertReceiver(self.lab.bridge_ip, self._on_alert)
        self.cluster = RealCluster(self.root, self.lab, self.n, self.regions, dict(sc.gossip), self.receiver.url)
        self.tables = [nf.DrillTable(self.lab.ns(i), self.lab.bridge_ip) for i in range(self.n)]
        self._refresh_tables()
        for e in self.episodes:
            if e.kind == "disk_full":
                for i in e.nodes:
                    if i not in self.fillers:
                        self.fillers[i] = nf.DiskFiller(self.cluster.nodes[i].state_dir)
                        self.fillers[i].mount()
        doc = self.root / "policy.toml"
        doc.write_text(document_toml(sc.policy.rules))
        self.envelopes = {s: self.cluster.sign(doc, s) for s in range(1, len(sc.policy.publish_at_ms) + 2)}
        self.policy_bytes = self.envelopes[len(self.envelopes)].stat().st_size
        for node in self.cluster.nodes:
            node.start()

    def _bootstrap(self) -> None:
        """Every node up and enforcing serial 1 (what the simulator's nodes are enrolled with)."""
        assert self.cluster is not None
        if not nf.wait_for(lambda: all(s is not None for s in self.latest), BOOT_TIMEOUT_S):
            down = [self.ids[i] for i, s in enumerate(self.latest) if s is None]
            raise DrillError(f"nodes not up after {BOOT_TIMEOUT_S:.0f} s: {down} (logs under {self.root})")
        ok, said = self.cluster.publish(self.cluster.nodes[0], self.envelopes[1])
        if not ok:
            raise DrillError(f"publishing serial 1 failed: {said}")
        if not nf.wait_for(lambda: all(_serial(s) >= 1 for s in self.latest), BOOT_TIMEOUT_S):
            raise DrillError(f"serial 1 not enforced everywhere after {BOOT_TIMEOUT_S:.0f} s: "
                             f"{[_serial(s) for s in self.latest]}")

    # -- the schedule -------------------------------------------------------------------------------
    def _schedule(self) -> None:
        sc = self.sc
        for k, ms in enumerate(sorted(sc.policy.publish_at_ms)):
            serial = k + 2
            self.at(ms, f"publish serial {serial}", self._publisher(serial))
        for e in self.episodes:
            self._schedule_episode(e)
        for ms, hook in self.hooks:
            self.at(ms, "hook", self._hook(hook))

    def _hook(self, hook: Callable[[RealDrill], None]) -> Callable[[], str]:
        def run() -> str:
            hook(self)
            return ""
        return run

    def _run_timeline(self) -> None:
        end = self.sc.duration_ms
        while True:
            with self.act_lock:
                if not self._heap or self._heap[0][0] > end:
                    break
                ms, _, label, fn = heapq.heappop(self._heap)
            delay = ms / 1000 - (time.monotonic() - (self.t0 or 0))
            if delay > 0:
                time.sleep(delay)
            got = self.now_ms()
            with self.act_lock:
                result = fn()
            note = result if isinstance(result, str) else ""
            self.timeline.append({"planned_ms": ms, "at_ms": got, "action": label, **({"note": note} if note else {})})
            self.say(f"{label}{f' ({note})' if note else ''}")
        remaining = end / 1000 - (time.monotonic() - (self.t0 or 0))
        if remaining > 0:
            time.sleep(remaining)
        for t in self.publishers:
            t.join(30)

    # -- actions ------------------------------------------------------------------------------------
    def node(self, i: int) -> RealNode:
        assert self.cluster is not None
        return self.cluster.nodes[i]

    def _publisher(self, serial: int) -> Callable[[], str]:
        return lambda: self._publish(serial)

    def _publish(self, serial: int) -> str:
        """Pick the target now (the simulator's draw); ``meshctl policy publish`` runs in its own thread so
        the fault timeline keeps its times (a Python process start takes a second on a busy machine)."""
        if self.authority_down:
            self.deferred.append(serial)
            return "deferred: the authority is down"
        region = self.sc.policy.publisher_region
        cands = [i for i in range(self.n) if self.node(i).alive and i not in self.blackholed
                 and (region is None or self.regions[i % len(self.regions)] == region)]
        if not cands:
            return "no live node to publish to"
        target = self.publisher_rng.choice(cands)
        t = threading.Thread(target=self._publish_to, args=(serial, target, self.now_ms()), daemon=True)
        self.publishers.append(t)
        t.start()
        return f"to {self.ids[target]}"

    def _publish_to(self, serial: int, target: int, started: int) -> None:
        """Publish as an operator does: when the node does not acknowledge (it was killed meanwhile: starting
        ``meshctl`` takes seconds here, the simulator's publish takes none), try another live node, up to
        ``PUBLISH_ATTEMPTS`` times (retries draw from their own generator, so later publishes keep the
        simulator's targets)."""
        assert self.cluster is not None
        for attempt in range(PUBLISH_ATTEMPTS):
            ok, said = self.cluster.publish(self.node(target), self.envelopes[serial])
            if ok:
                break
            with self.act_lock:
                self._note(started, f"serial {serial}: {self.ids[target]} did not acknowledge: {said[-160:]}")
                alive = [i for i in range(self.n) if self.node(i).alive and i not in self.blackholed]
                if not alive or attempt == PUBLISH_ATTEMPTS - 1:
                    return
                target = self.retry_rng.choice(alive)
        acked = self.now_ms()
        with self.act_lock:
            # the times of a version count from the moment the acknowledging node applied it
            self.published[serial] = self._applied_ms(target, serial) or acked
            self.checks.acknowledged(acked, target, serial)
            self._note(started, f"serial {serial} acknowledged by {self.ids[target]} after {acked - started} ms")
            for e in self.episodes:
                if e.kind == "kill9" and e.detail.get("after_publish") and e.start_ms <= started < (e.end_ms or 1 << 62):
                    self._down([target], False)
                    self._note(started, f"kill9 {self.ids[target]} right after it acknowledged serial {serial}")
                    back = self.now_ms() + int(e.detail["restart_after_ms"])
                    self.at(back, f"restart {self.ids[target]} (killed after its ack)", lambda: self._up([target]))
                    break

    def _applied_ms(self, i: int, serial: int) -> int | None:
        st = self.latest[i] or {}
        enf = st.get("enforcement") or {}
        if int(enf.get("applied_serial") or 0) != serial or enf.get("applied_at") is None:
            return None
        return int((float(enf["applied_at"]) - self.node(i).skew_s - self.wall0) * 1000)

    def _note(self, planned: int, action: str) -> None:
        self.timeline.append({"planned_ms": planned, "at_ms": self.now_ms(), "action": action})
        self.say(action)

    # -- observation --------------------------------------------------------------------------------
    def _sampler(self, i: int) -> None:
        nf.enter_netns(self.lab.ns(i))
        kernel = NftBackend(nf.NODE_TABLE)
        while not self._stop.is_set():
            started = time.monotonic()
            self._sample_once(i, kernel)
            self._stop.wait(max(0.0, SAMPLE_MS / 1000 - (time.monotonic() - started)))

    def _sample_once(self, i: int, kernel: NftBackend) -> None:
        node = self.node(i) if self.cluster else None
        alive = node is not None and node.alive
        st = admin_status() if alive else None
        if st is not None:
            self.latest[i] = st
        if self.t0 is None:
            return
        t = self.now_ms()
        if st is None:
            self.history[i].append((t, False, 0, None))
            self.checks.sample(t, i, Sample(up=False))
            return
        enf = st.get("enforcement") or {}
        serial = int(enf.get("applied_serial") or 0)
        try:
            held = kernel.read_kernel_hash()
        except EnforcementError:
            return  # nft itself failed (e.g. descriptor pressure on us): no observation
        at = enf.get("applied_at")
        applied = None if at is None else int((float(at) - self.node(i).skew_s - self.wall0) * 1000)
        self.history[i].append((t, True, serial, applied))
        claimed = enf.get("ruleset_hash") if serial > 0 else None
        self.checks.sample(t, i, Sample(True, (int(st.get("root_version") or 0), serial), claimed, held))

    def _gap_reporter(self, i: int) -> Callable[[int, int], None]:
        return lambda start, end: self.checks.kernel_gap(start, end, i)

    def _on_alert(self, node_id: str, check: str, action: str) -> None:
        if node_id in self.ids:
            self.checks.alert(self.now_ms(), self.ids.index(node_id), check, action)
            key = f"{check}.{action}"
            self.alert_counts[key] = self.alert_counts.get(key, 0) + 1

    # -- the end ------------------------------------------------------------------------------------
    def _finish(self, wall_s: float) -> dict[str, Any]:
        end = self.now_ms()
        live = [i for i in range(self.n) if self.node(i).alive and self.latest[i] is not None]
        final: dict[int, tuple[int, int] | None] = {
            i: (int((self.latest[i] or {}).get("root_version") or 0), _serial(self.latest[i])) for i in live}
        last_serial = len(self.sc.policy.publish_at_ms) + 1
        heal = last_heal_ms(self.episodes, self.sc.duration_ms)
        for w in self.watches:
            if w.gap_open_since() is not None:
                self.checks.kernel_gap(w.gap_open_since() or 0, end, self.watches.index(w))
        invariants = self.checks.finish(end, live, final, last_serial, heal, self.sc.checks.require_convergence)
        return real_report(self, invariants, live, wall_s)

    def _teardown(self) -> None:
        for w in self.watches:
            w.stop()
        if self.cluster is not None:
            self.cluster.close()
        for f in self.fillers.values():
            f.unmount()
        if self.receiver is not None:
            self.receiver.close()
        self.lab.teardown()
        if not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)


def _serial(status: dict[str, Any] | None) -> int:
    if status is None:
        return -1
    return int((status.get("enforcement") or {}).get("applied_serial") or 0)
