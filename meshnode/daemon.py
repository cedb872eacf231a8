"""meshnode: the asyncio shell around the sans-IO gossip node.

Lifecycle (hypercorn / aiohttp web_runner style): set up in phases — identity and trust, stored state,
enforcement of the last-known-good policy (before any peer is reachable), the gossip node, listeners —
then run every task in one TaskGroup until SIGTERM; clean up in reverse in ``finally``.

One place executes the core's effects (``_execute``) and one timer is re-armed after every input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol import gossip_wire
from protocol.channel import ConnectionKind, HandshakeRateLimiter, SecureSession
from protocol.errors import MeshError, TrustError
from protocol.gossip_config import GossipConfig
from protocol.gossip_events import (
    Alert,
    Disconnect,
    Enforce,
    FrameReceived,
    LeaveRequested,
    LivenessChanged,
    MemberEntry,
    Now,
    PeerConnected,
    PeerDisconnected,
    PersistMembers,
    PersistPolicy,
    PersistRoot,
    PolicyResult,
    PolicySubmitted,
    RootsSubmitted,
    RulesetApplied,
    Send,
    SendFailed,
    TimerFired,
    Verdict,
)
from protocol.metadata import Certificate
from protocol.node import Node
from protocol.trust import TrustedState

from . import transport
from .config import ConfigError, LoadedConfig, load_config, split_hostport
from .enforcer import Enforcer
from .identity import Identity, load_identity
from .metrics import Metrics
from .sources import DropDirSource, UrlSource
from .state import StateStore
from .transport import MESH_PATH, WS_MAX_MSG_BYTES, Conn

OPERATOR_REQUEST_BYTES = 4 << 20
"""An operator request: a policy envelope at its cap (1 MiB, e.g. 4,096 rules) plus a root chain."""


def channel_message_caps(operator_bytes: int = OPERATOR_REQUEST_BYTES) -> dict[ConnectionKind, int]:
    """What one channel may reassemble, per connection kind: exactly the largest gossip message a peer
    may legitimately send (a bigger one would be refused by the decoder anyway, after costing the
    memory), and an operator request."""
    return {ConnectionKind.GOSSIP: gossip_wire.MAX_MESSAGE_BYTES, ConnectionKind.OPERATOR: operator_bytes}
SHUTDOWN_GRACE_S = 2.0
PERSIST_RETRY_MIN_S = 1.0
PERSIST_RETRY_MAX_S = 30.0
REAPPLY_RETRY_MAX_S = 10.0
REVALIDATE_INTERVAL_S = 30.0


class OperatorRequest(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    envelope: bytes = b""
    roots: list[bytes] = []


def _now() -> Now:
    return Now(ms=int(time.monotonic() * 1000), wall=time.time())


class MeshDaemon:
    def __init__(self, lc: LoadedConfig) -> None:
        self.lc = lc
        cfg = lc.cfg
        self.metrics = Metrics()
        self.log = structlog.get_logger("meshnode").bind(node=cfg.node.id)
        self.identity: Identity = load_identity(
            lc.resolve(cfg.identity.cert),
            lc.resolve(cfg.identity.identity_key),
            lc.resolve(cfg.identity.static_key),
            lc.resolve(cfg.trust.root),
        )
        if self.identity.node_id != cfg.node.id:
            raise ConfigError(f"{lc.path}: node.id {cfg.node.id!r} but the certificate is for {self.identity.node_id!r}")
        self.trust = TrustedState(self.identity.anchor, skew_s=cfg.trust.clock_skew_s)
        self.store = StateStore(lc.resolve(cfg.node.data_dir))
        self.listen_host, self.listen_port = split_hostport(cfg.mesh.listen, "mesh.listen")
        self.advertise = cfg.mesh.advertise or cfg.mesh.listen
        self.enforcer = Enforcer(lc, self.identity, self.trust, self.metrics, self.log, self._on_ruleset_applied)
        self.node: Node | None = None
        self.conns: dict[str, list[Conn]] = {}
        self.operator_conns: set[Conn] = set()
        self.handshaking: set[Conn] = set()  # inbound channels still in their handshake
        self.by_addr: dict[str, Conn] = {}
        self.dialing: dict[str, list[bytes]] = {}
        self.boot_members: dict[str, Certificate] = {}  # the stored directory, verified at boot
        self.stored_members: list[MemberEntry] = []  # ... and the member file it came from, for the core
        self.limiter = HandshakeRateLimiter(
            cfg.mesh.handshake_rate_per_s, cfg.mesh.handshake_burst, total_rate_per_s=cfg.mesh.handshake_rate_per_s * 10
        )
        self.overrides = lc.active_overrides()
        self.preauth = transport.PreauthGuard(
            deadline_s=cfg.mesh.handshake_timeout_ms / 1000, per_source=cfg.mesh.preauth_per_source,
            total=cfg.mesh.preauth_max, on_refuse=self._preauth_refused,
        )
        # Unauthenticated peers must not be able to flood the log: refusals are counted in metrics always,
        # logged at most a few times a second per reason (with the number suppressed in between).
        self._log_budget = LogBudget(per_s=2.0, burst=10)
        # State writes that failed, latest per key ("policy", "root.<v>", "peers", "members"), retried
        # with backoff from the timer loop; one alert per episode.
        self._unsaved: dict[str, tuple[str, Callable[[], None]]] = {}
        self._persist_retry_at: float | None = None
        self._persist_backoff_s = PERSIST_RETRY_MIN_S
        self._persist_alerted = False
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self._sources: list[DropDirSource | UrlSource] = []
        self.started_at = time.time()
        self.bound_mesh_port: int | None = None
        self.bound_admin_port: int | None = None

    # -- phases ---------------------------------------------------------------------------------------
    def _boot_state(self) -> None:
        now = time.time()
        report = self.store.load_into(self.trust, now)
        for problem in report.problems:
            self.metrics.state_problems.inc()
            self.log.warning("state.problem", problem=problem)
        self.log.info("state.loaded", root_version=self.trust.root_version, serial=self.trust.serial,
                      roots_loaded=report.roots_loaded, policy_state=self.trust.policy_state(now))
        self.stored_members = self.store.load_members()
        self.boot_members = {}
        for entry in self.stored_members:
            try:
                cert = self.trust.verify_certificate(entry.cert, now)
            except TrustError as exc:
                self.log.info("state.member_dropped", member=entry.node_id, reason=str(exc))
                continue
            if cert.node_id == entry.node_id:
                self.boot_members[entry.node_id] = cert
        self.boot_members[self.identity.node_id] = self.identity.cert
        try:
            self.trust.verify_certificate(self.identity.cert_bytes, now)
        except TrustError as exc:
            # Keep enforcing the last-known-good policy (fail-static), but say loudly that peers will refuse us.
            self._alert("node.certificate_invalid", {"reason": exc.reason, "error": str(exc)})

    def _make_node(self) -> Node:
        cfg = self.lc.cfg
        gossip = GossipConfig.from_mapping(dict(cfg.gossip))
        return Node(
            config=gossip,
            trust=self.trust,
            node_id=self.identity.node_id,
            cert_bytes=self.identity.cert_bytes,
            identity_seed=self.identity.identity_seed,
            advertise=self.advertise,
            seeds=list(cfg.mesh.seeds),
            entropy=transport.entropy,
            known_members=self.stored_members,
            # what the boot apply already enforces (its RulesetApplied came before the node existed)
            enforced=(self.enforcer.applied_serial, self.enforcer.applied_hash or ""),
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                             (signal.SIGHUP, self._request_reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        for name in self.overrides:
            self.metrics.overrides.labels(name).set(1)
            self.log.warning("config.override_active", override=name)
        library_logs = _LibraryLogCounter(self.metrics)
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(library_logs)
        try:
            await self._run()
        finally:
            for name in _LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(library_logs)

    async def _run(self) -> None:
        self._boot_state()
        # Enforce the last-known-good policy before any peer is reachable.
        await self.enforcer.setup()
        if self.trust.policy is not None:
            await self.enforcer.apply_now(self.trust.policy, list(self.boot_members.values()),
                                          self.trust.policy_hash or "")
        self._update_policy_metrics()
        self.node = self._make_node()
        src = self.lc.cfg.mesh.source_address
        connector = aiohttp.TCPConnector(local_addr=(src, 0) if src else None, limit=0)
        self._http = aiohttp.ClientSession(connector=connector,
                                           timeout=aiohttp.ClientTimeout(total=None, sock_connect=3))
        try:
            await self._start_listeners()
            self.log.info("meshnode.started", mesh=f"{self.listen_host}:{self.bound_mesh_port}",
                          admin=self.lc.cfg.admin.listen if self.lc.cfg.admin.enabled else None,
                          backend=self.enforcer.backend_name, overrides=self.overrides)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._timer_loop(), name="timer")
                tg.create_task(self._supervised("enforcer", self.enforcer.run), name="enforcer")
                tg.create_task(self._supervised("drift", self.enforcer.drift_loop), name="drift")
                tg.create_task(self._revalidate_loop(), name="revalidate")
                tg.create_task(self._reapply_loop(), name="reapply")
                self._start_sources(tg)
                self._feed(TimerFired())
                await self._stop.wait()
                await self._leave()
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            self._tg = None
            # Close every channel at once: one stalled peer must not hold up the others (each close
            # waits up to a few seconds for the peer's reply).
            closing = [c for conns in self.conns.values() for c in conns] + list(self.operator_conns)
            closing += list(self.handshaking)
            await asyncio.gather(*(transport.close(c, "node shutting down") for c in closing))
            for runner in reversed(self._runners):
                await runner.cleanup()
            if self._http is not None:
                await self._http.close()
            self.log.info("meshnode.stopped")

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived task; an OS-level failure (EMFILE, ENOSPC, no thread for to_thread) restarts it
        after a backoff instead of ending the TaskGroup and the daemon. The enforcer re-applies the
        trusted policy when it comes back, so trusted and enforced do not stay apart."""
        backoff_s = PERSIST_RETRY_MIN_S
        while True:
            try:
                await run()
                return
            except (OSError, RuntimeError, MeshError) as exc:
                self.metrics.internal_errors.labels(f"task.{name}").inc()
                self.log.error("task.failed", task=name, error=f"{type(exc).__name__}: {exc}"[:300],
                               restart_in_s=backoff_s)
                self._alert("node.task_failed", {"task": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                await asyncio.sleep(backoff_s)
                backoff_s = min(PERSIST_RETRY_MAX_S, backoff_s * 2)
                if name == "enforcer":
                    self.enforcer.want_again()

    def request_stop(self) -> None:
        self.log.info("meshnode.stopping")
        self._stop.set()

    async def _leave(self) -> None:
        if self.node is None:
            return
        self._feed(LeaveRequested())
        # Give the leave announcement a moment to reach peers.
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while time.monotonic() < deadline and any(not c.queue.empty() for cs in self.conns.values() for c in cs):
            await asyncio.sleep(0.05)

    def _request_reload(self) -> None:
        try:
            new = load_config(self.lc.path)
        except ConfigError as exc:
            self.log.error("config.reload_failed", reason=str(exc), kept="running configuration")
            return
        restart_needed = [s for s in ("node", "identity", "trust", "mesh", "admin", "gossip")
                          if getattr(new.cfg, s) != getattr(self.lc.cfg, s)]
        self.lc = new
        old_overrides, self.overrides = self.overrides, new.active_overrides()
        for name in set(old_overrides) | set(self.overrides):
            self.metrics.overrides.labels(name).set(1 if name in self.overrides else 0)
        for name in set(self.overrides) - set(old_overrides):
            self.log.warning("config.override_active", override=name)
        self.enforcer.reconfigure(new)
        for src in self._sources:
            src.reconfigure(new)
        self.enforcer.want_again()
        self.log.info("config.reloaded", needs_restart=restart_needed, overrides=self.overrides)

    async def _start_listeners(self) -> None:
        cfg = self.lc.cfg
        deadline_s = self.preauth.deadline_s
        # aiohttp's low-level server (one route): every accepted socket is reported to the guard, which
        # aborts it unless it authenticates within the handshake deadline, measured from the accept.
        server = transport.GuardedServer(self._mesh_request, guard=self.preauth, access_log=None,
                                         keepalive_timeout=deadline_s, max_line_size=1024, max_field_size=1024,
                                         max_headers=32)
        # shutdown_timeout bounds how long a stop waits for handlers (e.g. a peer stalling its handshake).
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.listen_host, self.listen_port, reuse_address=True)
        await site.start()
        self.bound_mesh_port = _bound_port(runner) or self.listen_port
        if cfg.admin.enabled:
            host, port = split_hostport(cfg.admin.listen, "admin.listen")
            admin = web.Application()
            admin.router.add_get("/healthz", self._healthz)
            admin.router.add_get("/readyz", self._readyz)
            admin.router.add_get("/v1/status", self._status)
            admin.router.add_get("/metrics", self._metrics)
            arunner = web.AppRunner(admin, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
            await arunner.setup()
            self._runners.append(arunner)
            await web.TCPSite(arunner, host, port, reuse_address=True).start()
            self.bound_admin_port = _bound_port(arunner) or port

    def _start_sources(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.lc.cfg
        if cfg.sources.drop_dir:
            src = DropDirSource(self.lc, self._submit_policy, self.log)
            self._sources.append(src)
            tg.create_task(src.run(), name="drop-dir")
        if cfg.sources.urls:
            assert self._http is not None
            usrc = UrlSource(self.lc, self._http, self._submit_policy, self.log)
            self._sources.append(usrc)
            tg.create_task(usrc.run(), name="url-poll")

    # -- the core -------------------------------------------------------------------------------------
    def _feed(self, inp: Any) -> list[Any]:
        assert self.node is not None
        effects = self.node.handle(_now(), inp)
        self._execute(effects)
        self._wake.set()
        return effects

    async def _timer_loop(self) -> None:
        assert self.node is not None
        while True:
            self._wake.clear()
            timeout = self._next_wakeup_s()
            # asyncio.timeout, not wait_for: on 3.11 wait_for turns a cancellation that races the
            # deadline into TimeoutError, and the loop would then feed the core during shutdown.
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                self._retry_persist()
                self._feed(TimerFired())

    def _execute(self, effects: Sequence[Any]) -> None:
        """The one place effects run. Durable effects come first in the list and run synchronously.

        No effect can stop the daemon or the effects after it: a failed state write is kept pending and
        retried (the policy is still enforced: trusted and enforced never drift apart, the alert says the
        state is not durable), and anything else is logged, counted and alerted."""
        for eff in effects:
            try:
                self._execute_one(eff)
            except Exception as exc:  # noqa: BLE001 - the bulkhead: one failed effect must not stop the node
                self.metrics.internal_errors.labels(f"effect.{type(eff).__name__}").inc()
                self._alert("node.internal_error", {"effect": type(eff).__name__,
                                                    "error": f"{type(exc).__name__}: {exc}"[:300]})
                self.log.error("effect.failed", effect=type(eff).__name__, exc_info=exc)

    def _execute_one(self, eff: Any) -> None:
        match eff:
            case PersistPolicy(serial=serial, envelope=envelope):
                self._persist("policy", "policy", lambda: self.store.save_policy(serial, envelope))
            case PersistRoot(version=version, envelope=envelope):
                self._persist(f"root.{version}", "root", lambda: self.store.save_root(version, envelope))
            case PersistMembers(entries=entries):
                self._persist("members", "members", lambda: self.store.save_members(entries))
            case Enforce(policy=policy, policy_hash=policy_hash, members=members):
                new_policy = policy_hash != self.enforcer.wanted_hash
                self.enforcer.want(policy, list(members.values()), policy_hash)
                if new_policy:
                    self.log.info("policy.accepted", serial=policy.serial, hash=policy_hash[:16])
                    self._update_policy_metrics()
                    self._revalidate_sessions()
            case Send(peer=peer, address=address, data=data):
                self._send(peer, address, data)
            case Disconnect(peer=peer, reason=reason):
                self.metrics.frames_refused.labels("peer_misbehaved").inc()
                self.log.warning("peer.disconnected", peer=peer, reason=reason)
                for c in list(self.conns.get(peer, [])):
                    self._spawn(transport.close(c, reason))
            case PolicyResult():
                pass  # answered by the caller that submitted it
            case Alert(event=event, fields=fields):
                self._alert(event, fields)
            case LivenessChanged(node_id=nid, liveness=liveness, incarnation=inc):
                self.log.info("member.liveness", member=nid, liveness=liveness, incarnation=inc)
            case _:
                self.log.warning("effect.unknown", effect=type(eff).__name__)

    # -- durable state -------------------------------------------------------------------------------
    def _persist(self, key: str, kind: str, write: Callable[[], None]) -> None:
        """Write one piece of state now; when the write fails (EMFILE, ENOSPC, EIO, a read-only disk),
        keep it as the latest pending write for `key` and retry it from the timer loop with backoff."""
        self._unsaved.pop(key, None)
        try:
            write()
        except OSError as exc:
            self._unsaved[key] = (kind, write)
            self._persist_failed(kind, exc)
        self.metrics.state_unsaved.set(len(self._unsaved))

    def _persist_failed(self, kind: str, exc: OSError) -> None:
        self.metrics.state_write_failures.labels(kind).inc()
        error = f"{type(exc).__name__}: {exc.strerror or exc}"[:200]
        if self._log_budget.allow("state.write_failed", transport.now_ms()):
            self.log.error("state.write_failed", kind=kind, error=error, retry_in_s=self._persist_backoff_s,
                           suppressed=self._log_budget.take_suppressed("state.write_failed"))
        if not self._persist_alerted:  # one alert per episode, until every pending write succeeded
            self._persist_alerted = True
            self._alert("state.write_failed", {"kind": kind, "error": error, "durable": False,
                                               "note": "enforcing, but a restart would lose this state; retrying"})
        if self._persist_retry_at is None:
            self._persist_retry_at = time.monotonic() + self._persist_backoff_s

    def _retry_persist(self) -> None:
        """Retry every pending write once its backoff has passed (called from the timer loop)."""
        if self._persist_retry_at is None or time.monotonic() < self._persist_retry_at:
            return
        self._persist_retry_at = None
        for key, (kind, write) in list(self._unsaved.items()):
            try:
                write()
            except OSError as exc:
                self._persist_backoff_s = min(PERSIST_RETRY_MAX_S, self._persist_backoff_s * 2)
                self._persist_failed(kind, exc)
                break
            if self._unsaved.get(key, (None, None))[1] is write:
                del self._unsaved[key]
        self.metrics.state_unsaved.set(len(self._unsaved))
        if not self._unsaved:
            self._persist_backoff_s = PERSIST_RETRY_MIN_S
            if self._persist_alerted:
                self._persist_alerted = False
                self.log.warning("state.write_recovered", serial=self.trust.serial)

    def _next_wakeup_s(self) -> float | None:
        assert self.node is not None
        deadline = self.node.next_deadline()
        timeout = None if deadline is None else max(0.0, (deadline - _now().ms) / 1000)
        if self._persist_retry_at is not None:
            retry = max(0.0, self._persist_retry_at - time.monotonic())
            timeout = retry if timeout is None else min(timeout, retry)
        return timeout

    def _update_policy_metrics(self) -> None:
        now = time.time()
        pol = self.trust.policy
        self.metrics.policy_serial.set(self.trust.serial)
        if pol is not None:
            self.metrics.policy_expires.set(pol.expires_at)
        state = self.trust.policy_state(now)
        for s in ("none", "fresh", "stale"):
            self.metrics.policy_state.labels(s).set(1 if s == state else 0)

    def _alert(self, event: str, fields: dict[str, Any]) -> None:
        self.metrics.alerts.labels(event).inc()
        self.log.warning(f"alert.{event}" if not event.startswith("alert.") else event, **fields)
        hooks = self.lc.cfg.alerts.webhook_urls
        if hooks and self._http is not None:
            body = {"node": self.identity.node_id, "event": event, "fields": fields, "at": time.time()}
            for url in hooks:
                self._spawn(self._post_alert(url, body))

    async def _post_alert(self, url: str, body: dict[str, Any]) -> None:
        assert self._http is not None
        try:
            async with self._http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status >= 300:
                    self.log.warning("alert.webhook_failed", url=url, status=resp.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.log.warning("alert.webhook_failed", url=url, reason=str(exc) or type(exc).__name__)

    def _on_ruleset_applied(self, serial: int, ruleset_hash: str, policy_hash: str) -> None:
        self.metrics.applied_serial.set(serial)
        if self.node is not None:
            self._feed(RulesetApplied(serial=serial, ruleset_hash=ruleset_hash, policy_hash=policy_hash))

    def _submit_policy(self, envelope: bytes, source: str, roots: Sequence[bytes] = ()) -> PolicyResult:
        """Feed a policy from a local source; returns the core's verdict (after it was persisted)."""
        if roots:
            for eff in self._feed(RootsSubmitted(chain=list(roots), source=source)):
                if isinstance(eff, PolicyResult) and not eff.accepted:
                    self.metrics.policies_refused.labels("bad_root").inc()
                    return eff
        result = PolicyResult(source, False, 0, Verdict.NO_VERDICT, "no verdict from the core")
        for eff in self._feed(PolicySubmitted(envelope=envelope, source=source)):
            if isinstance(eff, PolicyResult) and eff.source == source:
                result = eff
        if not result.accepted:
            self.metrics.policies_refused.labels(result.reason.value).inc()
            self.log.warning("policy.refused", source=source, reason=result.text)
        return result

    # -- connections ----------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        if self._tg is not None:
            try:
                self._tg.create_task(coro)
                return
            except RuntimeError:  # the TaskGroup is shutting down: nothing new starts
                pass
        coro.close()

    def _on_bytes(self, direction: str, n: int) -> None:
        self.metrics.bytes.labels(direction).inc(n)

    def _send(self, peer: str, address: str, data: bytes) -> None:
        conns = self.conns.get(peer) if peer else None
        conn = conns[-1] if conns else self.by_addr.get(address)
        if conn is not None and not conn.closed:
            if not conn.enqueue(data):
                self.log.warning("peer.slow", peer=conn.peer, queued=conn.queue.qsize())
                self.metrics.frames_refused.labels("send_queue_full").inc()
                self._spawn(transport.close(conn, "send queue full"))
            return
        if not address:
            self._feed_later(SendFailed(peer=peer, address=address))
            return
        if address in self.dialing:
            self.dialing[address].append(data)
            return
        self.dialing[address] = [data]
        self._spawn(self._dial(address, peer))

    def _feed_later(self, inp: Any) -> None:
        asyncio.get_running_loop().call_soon(self._feed_if_running, inp)

    def _feed_if_running(self, inp: Any) -> None:
        if self.node is not None and self._tg is not None:
            self._feed(inp)

    def _new_session(self, *, initiator: bool, expected_peer: str | None = None) -> SecureSession:
        mesh = self.lc.cfg.mesh
        return SecureSession(
            initiator=initiator,
            trust=self.trust,
            static_private=self.identity.static_private,
            certificate=self.identity.cert_bytes,
            entropy=transport.entropy,
            now_ms=transport.now_ms(),
            accept=frozenset({ConnectionKind.GOSSIP}) if initiator
            else frozenset({ConnectionKind.GOSSIP, ConnectionKind.OPERATOR}),
            expected_peer=expected_peer,
            handshake_timeout_ms=mesh.handshake_timeout_ms,
            max_message_bytes=channel_message_caps(mesh.max_message_bytes),
        )

    async def _dial(self, address: str, peer: str) -> None:
        assert self._http is not None
        log = self.log.bind(peer=peer or None, address=address)
        conn: Conn | None = None
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(f"http://{address}{MESH_PATH}", max_msg_size=WS_MAX_MSG_BYTES,
                                      autoping=True, heartbeat=None),
                timeout=5,
            )
            conn = Conn(ws=ws, session=self._new_session(initiator=True, expected_peer=peer or None),
                        inbound=False, address=address)
            await transport.handshake(conn, self._on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            self.dialing.pop(address, None)
            reason = transport.refusal_reason(exc)
            self.metrics.handshakes.labels("failed", reason).inc()
            log.info("dial.failed", reason=reason, detail=str(exc)[:200])
            if conn is not None:
                await transport.close(conn, reason)
            self._feed_if_running(SendFailed(peer=peer, address=address))
            return
        self.metrics.handshakes.labels("ok", "outbound").inc()
        pending = self.dialing.pop(address, [])
        self.by_addr[address] = conn
        try:
            self._register(conn)
            for data in pending:
                conn.enqueue(data)
            await self._serve(conn)
        finally:
            if self.by_addr.get(address) is conn:
                del self.by_addr[address]

    def _preauth_refused(self, source: str, reason: str) -> None:
        self.metrics.handshakes.labels("refused", reason).inc()
        if self._log_budget.allow(f"handshake.refused/{reason}", transport.now_ms()):
            self.log.info("handshake.refused", remote=source, reason=reason,
                          suppressed=self._log_budget.take_suppressed(f"handshake.refused/{reason}"))

    async def _mesh_request(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every HTTP request on the mesh port. Whatever goes wrong in one lands in the JSON log and
        the metrics and costs only that connection."""
        if request.path != MESH_PATH or request.method != "GET":
            self.metrics.handshakes.labels("refused", "not_found").inc()
            return web.Response(status=404, text="not found\n")
        try:
            return await self._mesh_handler(request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a bug hit by one request costs that request
            self.metrics.handshakes.labels("failed", "internal_error").inc()
            self._alert("node.internal_error", {"remote": request.remote or "?",
                                                "error": f"{type(exc).__name__}: {exc}"[:300]})
            self.log.error("request.failed", remote=request.remote or "?", exc_info=exc)
            raise web.HTTPInternalServerError() from None

    async def _mesh_handler(self, request: web.BaseRequest) -> web.StreamResponse:
        source = request.remote or "?"
        if not self.limiter.allow(source, transport.now_ms()):
            self.metrics.handshakes.labels("refused", "rate_limited").inc()
            return web.Response(status=429, text="handshake rate limit\n")
        if sum(len(v) for v in self.conns.values()) + len(self.operator_conns) >= self.lc.cfg.mesh.max_peers:
            self.metrics.handshakes.labels("refused", "too_many_peers").inc()
            return web.Response(status=503, text="too many peers\n")
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MSG_BYTES, autoping=True)
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp's ClientConnectionResetError is a ConnectionResetError
            # The peer reset during the upgrade ("Cannot write to closing transport"): a refusal, counted
            # and logged like any other, not an aiohttp traceback.
            self._preauth_refused(source, "reset_during_upgrade")
            self.log.debug("handshake.reset", remote=source, detail=str(exc)[:200])
            return ws
        conn = Conn(ws=ws, session=self._new_session(initiator=False), inbound=True, address=source)
        self.handshaking.add(conn)
        try:
            await transport.handshake(conn, self._on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            reason = transport.refusal_reason(exc)
            self.metrics.handshakes.labels("refused", reason).inc()
            if self._log_budget.allow(f"handshake.refused/{reason}", transport.now_ms()):
                self.log.info("handshake.refused", remote=source, reason=reason, detail=str(exc)[:200],
                              suppressed=self._log_budget.take_suppressed(f"handshake.refused/{reason}"))
            await transport.close(conn, reason, refused=True)
            return ws
        finally:
            self.handshaking.discard(conn)
        self.preauth.authenticated(request.protocol)
        self.metrics.handshakes.labels("ok", "inbound").inc()
        if self._tg is None:
            # Listening but not serving (still starting, or stopping): registering the channel now
            # would leave it in self.conns with no reader or writer, swallowing every send to that peer.
            await transport.close(conn, "node not serving")
            return ws
        if conn.kind is ConnectionKind.OPERATOR:
            await self._serve_operator(conn)
        else:
            self._register(conn)
            await self._serve(conn)
        return ws

    def _register(self, conn: Conn) -> None:
        peer = conn.peer
        lst = self.conns.setdefault(peer, [])
        self._limit_channels(lst, "gossip")
        lst.append(conn)
        self.metrics.connections.labels("gossip").set(sum(len(v) for v in self.conns.values()))
        self.log.debug("peer.connected", peer=peer, conn=conn.id, inbound=conn.inbound)
        cert = conn.session.peer_certificate or b""
        self._feed(PeerConnected(peer=peer, cert_bytes=cert))

    def _unregister(self, conn: Conn) -> None:
        peer = conn.peer
        lst = self.conns.get(peer, [])
        if conn in lst:
            lst.remove(conn)
        if not lst:
            self.conns.pop(peer, None)
            self._feed_if_running(PeerDisconnected(peer=peer))
        self.metrics.connections.labels("gossip").set(sum(len(v) for v in self.conns.values()))

    async def _on_gossip(self, conn: Conn, data: bytes) -> None:
        self._feed(FrameReceived(peer=conn.peer, data=data))

    async def _serve(self, conn: Conn) -> None:
        """Run one authenticated gossip connection until it ends; its failure costs only itself."""
        assert self._tg is not None
        writer = self._tg.create_task(self._write(conn))
        reason = "closed"
        try:
            reason = await transport.reader(conn, self._on_gossip, self._on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            reason = transport.refusal_reason(exc)
            if isinstance(exc, transport.HandshakeRefusedError):
                # Our own certificate was refused (revoked, expired, another authority): say it loudly,
                # but not on every redial.
                self.metrics.handshakes.labels("refused_by_peer", exc.reason).inc()
                if self._log_budget.allow("peer.refused_us", transport.now_ms()):
                    self.log.warning("peer.refused_us", peer=conn.peer, reason=exc.reason,
                                     suppressed=self._log_budget.take_suppressed("peer.refused_us"))
            else:
                self.metrics.frames_refused.labels(reason).inc()
                self.log.info("peer.dropped", peer=conn.peer, conn=conn.id, reason=reason, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - the bulkhead: a bug hit by one peer's input costs that peer
            reason = "internal_error"
            self.metrics.frames_refused.labels(reason).inc()
            self._alert("node.internal_error", {"peer": conn.peer, "error": f"{type(exc).__name__}: {exc}"[:300]})
            self.log.error("peer.handler_crashed", peer=conn.peer, conn=conn.id, exc_info=exc)
        finally:
            await transport.close(conn, reason)
            writer.cancel()
            self._unregister(conn)

    async def _write(self, conn: Conn) -> None:
        try:
            await transport.writer(conn, self._on_bytes)
        except (MeshError, aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as exc:
            self.log.info("peer.write_failed", peer=conn.peer, reason=transport.refusal_reason(exc))
            await transport.close(conn, "write failed")

    def _limit_channels(self, existing: Sequence[Conn], kind: str) -> None:
        """One identity holds at most `max_channels_per_peer` channels: a new one closes the oldest
        (a redial after a silent loss must win, and a rogue's extra channels cost it its old ones)."""
        live = [c for c in existing if not c.closed and not c.retired]
        for old in live[: max(0, len(live) - self.lc.cfg.mesh.max_channels_per_peer + 1)]:
            self.metrics.frames_refused.labels("too_many_channels").inc()
            if self._log_budget.allow(f"peer.channel_limit/{kind}", transport.now_ms()):
                self.log.info("peer.channel_limit", peer=old.peer, kind=kind, closed=old.id,
                              suppressed=self._log_budget.take_suppressed(f"peer.channel_limit/{kind}"))
            old.retired = True
            self._spawn(transport.close(old, "too many channels for this identity"))

    async def _serve_operator(self, conn: Conn) -> None:
        op = conn.peer
        self._limit_channels(sorted((c for c in self.operator_conns if c.peer == op), key=lambda c: c.id),
                             "operator")
        self.operator_conns.add(conn)
        self.metrics.connections.labels("operator").set(len(self.operator_conns))
        self.log.info("operator.connected", operator=op, conn=conn.id)
        assert self._tg is not None
        writer = self._tg.create_task(self._write(conn))
        try:
            await transport.reader(conn, self._on_operator_message, self._on_bytes)
        except (TimeoutError, MeshError, aiohttp.ClientError, OSError) as exc:
            self.metrics.frames_refused.labels(transport.refusal_reason(exc)).inc()
            self.log.info("operator.dropped", operator=op, reason=transport.refusal_reason(exc))
        finally:
            await transport.close(conn, "done")
            writer.cancel()
            self.operator_conns.discard(conn)
            self.metrics.connections.labels("operator").set(len(self.operator_conns))

    async def _on_operator_message(self, conn: Conn, data: bytes) -> None:
        try:
            req = msgspec.msgpack.decode(data, type=OperatorRequest) if len(data) <= conn.session.max_message_bytes else None
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            req = None
        if req is None:
            self.metrics.frames_refused.labels("bad_operator_request").inc()
            conn.enqueue(msgspec.msgpack.encode({"ok": False, "reason": "malformed request"}))
            return
        if req.op == "publish":
            source = f"operator:{conn.peer}:{conn.id}"
            result = self._submit_policy(req.envelope, source, req.roots)
            self.log.info("operator.publish", operator=conn.peer, accepted=result.accepted, serial=result.serial,
                          reason=result.text)
            reply = {"ok": result.accepted, "serial": result.serial, "reason": result.text}
        elif req.op == "status":
            reply = {"ok": True, "status": self.status()}
        else:
            reply = {"ok": False, "reason": f"unknown operation {req.op!r}"}
        conn.enqueue(msgspec.msgpack.encode(reply))

    async def _reapply_loop(self) -> None:
        """A failed apply (EMFILE, ENOSPC, a busy kernel) keeps the previous ruleset; retry it with backoff
        until the kernel enforces what the node trusts, so trusted and enforced do not stay apart."""
        backoff_s = PERSIST_RETRY_MIN_S
        while True:
            await asyncio.sleep(backoff_s)
            wanted = self.enforcer.wanted
            if wanted is None or self.enforcer.last_error is None:
                backoff_s = PERSIST_RETRY_MIN_S
                continue
            self.log.info("enforce.retry", serial=wanted[0].serial, last_error=self.enforcer.last_error[:200])
            self.enforcer.want_again()
            backoff_s = min(REAPPLY_RETRY_MAX_S, backoff_s * 2)

    async def _revalidate_loop(self) -> None:
        """Certificates expire while channels are open: re-check every open channel periodically."""
        while True:
            await asyncio.sleep(REVALIDATE_INTERVAL_S)
            self._revalidate_sessions()
            self._update_policy_metrics()

    def _revalidate_sessions(self) -> None:
        wall = time.time()
        open_conns = [c for conns in self.conns.values() for c in conns] + list(self.operator_conns)
        for c in open_conns:
            if c.closed:
                continue
            try:
                c.session.revalidate(wall)
            except MeshError as exc:
                self.log.warning("peer.revoked", peer=c.peer, reason=str(exc))
                self.metrics.handshakes.labels("revoked", transport.refusal_reason(exc)).inc()
                self._spawn(transport.close(c, "certificate no longer valid"))

    # -- admin ----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = _now()
        core = self.node.status(now) if self.node is not None else {}
        pol = self.trust.policy
        return {
            "node": self.identity.node_id,
            "region": self.identity.cert.region,
            "cluster": self.trust.cluster,
            "uptime_s": round(time.time() - self.started_at, 1),
            "root_version": self.trust.root_version,
            "policy": {
                "serial": self.trust.serial,
                "hash": self.trust.policy_hash,
                "expires_at": pol.expires_at if pol else None,
                "state": self.trust.policy_state(now.wall),
            },
            "enforcement": self.enforcer.status(),
            "overrides": self.overrides,
            "connections": {"gossip": sum(len(v) for v in self.conns.values()), "operator": len(self.operator_conns)},
            "cluster_view": core,
        }

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        st = self.enforcer.status()
        if st.get("applied_serial", 0) > 0:
            return web.Response(text=f"ready: enforcing serial {st['applied_serial']}\n")
        return web.Response(status=503, text="not ready: no valid policy enforced yet\n")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.status(), indent=1, default=str), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        self._update_policy_metrics()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_LIBRARY_LOGGERS = ("aiohttp", "asyncio")


class _LibraryLogCounter(logging.Handler):
    """Counts the warnings and errors aiohttp and asyncio log (the root handler renders them as JSON)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self._metrics.library_log_records.labels(record.name, record.levelname.lower()).inc()


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a clean stop."""


class LogBudget:
    """Token bucket per log key, counting what it suppressed."""

    def __init__(self, per_s: float, burst: int) -> None:
        self._limiter = HandshakeRateLimiter(per_s, burst, max_sources=1024)
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now_ms: int) -> bool:
        if self._limiter.allow(key, now_ms):
            return True
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return False

    def take_suppressed(self, key: str) -> int:
        return self._suppressed.pop(key, 0)


def _bound_port(runner: web.AppRunner) -> int | None:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None


def run_daemon(config_path: Path) -> int:
    import uvloop

    lc = load_config(config_path)
    daemon = MeshDaemon(lc)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run())
    return 0
