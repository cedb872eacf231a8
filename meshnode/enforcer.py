"""The daemon's enforcement worker: render the wanted policy + member directory, apply it off the event
loop, keep the previous ruleset when anything fails, and repair drift on a timer and on request (the
ruleset watcher asks when another tool changed the kernel's ruleset).

The latest wish wins: ``want()`` replaces any wish not yet applied, and one task (``run()``) applies
them in turn, so a burst of member changes costs one apply, never a queue of them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from protocol.errors import MeshError
from protocol.trust import Certificate, PolicyVersion, TrustedState

from .config import LoadedConfig, split_hostport
from .enforce import Backend, EnforcementError, RenderOptions, make_backend, missing_tools, render
from .identity import Identity
from .metrics import Metrics


def render_options(config: LoadedConfig) -> RenderOptions:
    """The node-local rendering choices of a node config (ports, table, ICMP, overrides, join CIDRs)."""
    cfg = config.cfg
    _, mesh_port = split_hostport(cfg.mesh.listen, "mesh.listen")
    _, admin_port = split_hostport(cfg.admin.listen, "admin.listen")
    return RenderOptions(
        mesh_port=mesh_port,
        table=cfg.enforce.table,
        admin_port=admin_port if admin_port not in (0, mesh_port) else None,
        icmp_essential=cfg.enforce.icmp,
        break_glass_cidrs=tuple(cfg.overrides.break_glass_cidrs),
        log_rate=cfg.enforce.log_rate,
        mesh_join_cidrs=tuple(cfg.enforce.mesh_join_cidrs),
        abuse_block=cfg.validate.block_abusers_s > 0,
        # the port-scan sets: nftables only (the iptables and file backends skip the check)
        port_scan_window_s=cfg.validate.port_scan_window_s
        if cfg.validate.port_scan_ports and cfg.enforce.backend == "nftables" else 0,
    )


# A full replacement is confirmed by its committed ``nft`` transaction; the kernel is read back (and
# compared with the rendered hash) this long after, by the drift check, so the read-back's CPU is spent
# after a version has spread, not while every node applies it.  Half a second: a version reaches 12
# nodes in ~0.2 s, and a read-back one second after collided with the next version of a burst of
# publishes (the bench publishes every ~1.3 s; each read-back costs about as much CPU as the apply).
READ_BACK_AFTER_S = 0.5
PUSHES_FIRST_MAX_S = 0.035
"""Before an apply the worker waits, at most this long, until each body this node pushed on was
acknowledged or sent its last time (10 and 30 ms after the first): an apply holds the event loop (~5 ms;
50-100 ms on a saturated host), and a lost push's retransmission would wait behind it, and with it the
version for the whole subtree behind that peer.  Acknowledgements come back in about a millisecond on a
LAN, and a node with no push in flight (a leaf of the tree) does not wait."""
INLINE_APPLY_MAX_ELEMENTS = 2_000
"""An apply through libnftables (in-process) of a ruleset with up to this many set elements runs on the
event loop: ~3 ms for the bench's 12-member / 50-rule ruleset.  In a worker thread the same apply waited
for the interpreter lock behind the busy loop at every hand-over (16 ms median with a busy main thread,
measured; 40-100 ms per node in the 12-node netns bench).  Larger rulesets, and the ``nft`` tool's
process, go to a worker thread."""


class Enforcer:
    """Renders and applies what the daemon wants enforced, confirms what the kernel holds
    (``on_applied(serial, ruleset_hash, policy_hash)``) and reports it in ``status()``. Alert events go to
    ``on_event(name, facts)``: ``enforce.apply_failed`` / ``enforce.apply_recovered`` (the first good apply
    after a failure) and the backend's drift events (``enforce.drift_detected``, ``..._repaired``...)."""

    def __init__(
        self,
        config: LoadedConfig,
        identity: Identity,
        trust: TrustedState,
        metrics: Metrics,
        log: Any,
        on_applied: Callable[[int, str, str], None],
        on_event: Callable[[str, dict[str, Any]], None],
        pushes_delivered: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.identity = identity
        self.trust = trust
        self.metrics = metrics
        self.log = log.bind(component="enforce")
        self.on_applied = on_applied
        self.on_event = on_event
        self.pushes_delivered = pushes_delivered  # waits (at most its argument, s) for this node's pushes
        self.backend: Backend | None = None
        self._want: tuple[PolicyVersion, list[Certificate], str] | None = None  # queued for run()
        # the latest (policy, member certificates, policy hash) the core asked for (its Enforce effect)
        self.wanted: tuple[PolicyVersion, list[Certificate], str] | None = None
        self.wanted_since: float | None = None  # wall time the current wish's policy was first asked for
        self._event = asyncio.Event()
        self._drift_wanted = asyncio.Event()  # check drift now, without waiting for the timer
        self._read_back_timer: asyncio.TimerHandle | None = None  # the deferred read-back of the last load
        self.applied_serial = 0
        self.applied_hash: str | None = None  # of the ruleset
        self.applied_policy_hash = ""  # payload hash of the policy that ruleset enforces
        self.applied_members = 0  # how many member certificates (self included) that ruleset was rendered for
        self.last_error: str | None = None
        self.applied_at: float | None = None
        self.reconfigure(config)

    @property
    def backend_name(self) -> str:
        return self.config.cfg.enforce.backend

    def reconfigure(self, config: LoadedConfig) -> None:
        """Take a reloaded node config: rendering options and drift interval (the backend stays)."""
        self.config = config
        self.options = render_options(config)
        self.drift_interval = config.cfg.enforce.drift_check_s

    async def setup(self) -> None:
        """Build the configured backend (EnforcementError when its tools are missing)."""
        cfg = self.config.cfg
        missing = missing_tools(cfg.enforce.backend)
        if missing:
            raise EnforcementError(
                f"enforce.backend = {cfg.enforce.backend!r} needs {', '.join(missing)}, which is not installed"
            )
        self.backend = make_backend(
            cfg.enforce.backend,
            self.options,
            file_path=self.config.resolve(cfg.enforce.file),
            allow_file_backend=cfg.overrides.allow_file_backend,
        )
        if getattr(self.backend, "in_process", False):
            self.log.info("enforce.backend", backend=self.backend.name, nft="libnftables (in-process)")
        for path in self.backend.temps_removed:  # left by a write killed mid-way (file backend)
            self.metrics.state_problems.inc()
            self.log.warning("state.problem", problem=f"removed {path} left by an interrupted write")

    @property
    def wanted_hash(self) -> str:
        return self.wanted[2] if self.wanted is not None else ""

    def want(self, policy: PolicyVersion, members: list[Certificate], policy_hash: str) -> None:
        """Enforce ``policy`` (``policy_hash``: hex hash of its signed payload) for ``members`` as soon as
        the worker gets to it (the latest wish wins)."""
        if policy_hash != self.wanted_hash:
            self.wanted_since = time.time()
        self.wanted = self._want = (policy, members, policy_hash)
        self._event.set()

    def lag_s(self, now: float) -> float:
        """Seconds since the core asked for the policy this node does not enforce yet; 0 when enforced."""
        if self.wanted is None or self.wanted_hash == self.applied_policy_hash or self.wanted_since is None:
            return 0.0
        return max(0.0, now - self.wanted_since)

    def want_again(self) -> None:
        """Queue the latest wish once more (after a failed apply, a restarted worker, a reload).  Before
        the first verified policy there is none: the host's firewall is left as it is."""
        if self.wanted is not None:
            self._want = self.wanted
            self._event.set()

    async def apply_now(self, policy: PolicyVersion, members: list[Certificate], policy_hash: str) -> bool:
        """Render and load; True when the kernel now enforces ``policy``. Confirms (``on_applied``) the
        serial, ruleset hash and policy hash whenever one of them changed: an equivocation resolved to
        the lower hash may render the very same ruleset, and is still a change of what is enforced."""
        assert self.backend is not None
        backend = self.backend
        t0 = time.perf_counter()
        try:
            ruleset = render(policy, self.identity.cert, members, self.options, now=time.time(),
                             skew_s=self.trust.skew_s)
            if getattr(backend, "in_process", False) and ruleset.element_count <= INLINE_APPLY_MAX_ELEMENTS:
                result = backend.apply(ruleset, read_back_later=True)
            else:
                result = await asyncio.to_thread(partial(backend.apply, ruleset, read_back_later=True))
        except MeshError as exc:
            self.last_error = str(exc)
            self.metrics.apply_failures.inc()
            self.on_event("enforce.apply_failed", {"serial": policy.serial, "reason": str(exc)[:300],
                                                   "kept_serial": self.applied_serial})
            return False
        elapsed = time.perf_counter() - t0
        self.metrics.apply_seconds.observe(elapsed)
        if self.last_error is not None:
            self.on_event("enforce.apply_recovered", {"serial": policy.serial})
        self.last_error = None
        changed = (policy.serial, result.hash, policy_hash) != (
            self.applied_serial, self.applied_hash, self.applied_policy_hash)
        self.applied_serial, self.applied_hash, self.applied_policy_hash = policy.serial, result.hash, policy_hash
        self.applied_at = time.time()
        self.applied_members = len(members)
        if not result.verified:  # committed; read back off the critical path, before the next drift tick
            if self._read_back_timer is not None:
                self._read_back_timer.cancel()
            self._read_back_timer = asyncio.get_running_loop().call_later(READ_BACK_AFTER_S, self._drift_wanted.set)
        self.metrics.applied_serial.set(policy.serial)
        if changed:
            self.log.info("policy.applied", serial=policy.serial, ruleset_hash=result.hash[:16], mode=result.mode,
                          backend=result.backend, rules=ruleset.rule_count, ms=round(elapsed * 1000, 1),
                          read_back="pending" if not result.verified else "done")
            self.on_applied(policy.serial, result.hash, policy_hash)
        return True

    async def run(self) -> None:
        """Apply the latest wish whenever there is one (runs for the daemon's lifetime)."""
        while True:
            await self._event.wait()
            self._event.clear()
            if self._want is not None and self.pushes_delivered is not None:
                await self.pushes_delivered(PUSHES_FIRST_MAX_S)
            want, self._want = self._want, None
            if want is not None:
                await self.apply_now(*want)

    def check_drift_soon(self) -> None:
        """Run the drift check now instead of at the next tick (another tool changed the ruleset).  While
        the read-back of our own last load is pending (due within ``READ_BACK_AFTER_S``: the change seen
        is most likely that load), that read-back is the check."""
        if self.backend is not None and self.backend.read_back_pending:
            return
        self._drift_wanted.set()

    async def drift_loop(self) -> None:
        """Every ``drift_interval`` seconds, or at once when asked (:meth:`check_drift_soon`), read the
        kernel back and repair drift; the backend's drift events go to ``on_event``."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drift_interval):
                    await self._drift_wanted.wait()
            self._drift_wanted.clear()
            if self.backend is None or self.backend.applied is None:
                continue
            result = await asyncio.to_thread(self.backend.check_drift)
            for ev in result.events:
                self.on_event(ev.name, ev.facts)
            if result.drifted:
                self.metrics.drift.inc()

    def status(self) -> dict[str, Any]:
        """The ``enforcement`` section of ``/v1/status``."""
        return {
            "backend": self.backend_name,
            "applied_serial": self.applied_serial,
            "ruleset_hash": self.applied_hash,
            "policy_hash": self.applied_policy_hash or None,
            "applied_at": self.applied_at,
            "last_error": self.last_error,
            "drift_repairs": self.backend.drift_count if self.backend else 0,
            "enforcing": self.backend_name != "file",
        }
