"""The daemon's side of alerting without a daemon: AlertSender (routing, expiry lead time on a virtual
clock) and the nft monitor line filter / restart of the ruleset watcher."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshnode.alerting import AlertBook, AlertPipeline, Outbox
from meshnode.daemon.alerts import AlertSender
from meshnode.daemon.ruleset_watch import RulesetWatch, touches_table
from meshnode.metrics import Metrics

DAY = 86400.0
T0 = 1_700_000_000.0


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _rec(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    info = warning = error = debug = _rec

    def bind(self, **kw: Any) -> Log:
        return self


def sender(tmp_path: Path) -> tuple[AlertSender, Log, list[int]]:
    log, wakes = Log(), []
    pipe = AlertPipeline(AlertBook("prod", "node-1"), Outbox(tmp_path, [], log=log), [], log=log)
    return AlertSender(pipe, Metrics(), log, wake=lambda: wakes.append(1)), log, wakes


def test_alert_events_are_logged_with_what_the_lifecycle_made_of_them(tmp_path: Path) -> None:
    s, log, wakes = sender(tmp_path)
    facts = {"backend": "file", "table": "policymesh"}
    s.alert("enforce.drift_detected", facts)
    s.alert("enforce.drift_detected", facts)
    s.alert("enforce.drift_repaired", facts)
    s.alert("node.certificate_expiring", {"not_after": 1})
    s.alert("enforce.apply_failed", {"serial": 3, "reason": "EMFILE"})
    s.alert("enforce.apply_recovered", {"serial": 3})
    actions = [(e, kw["alert_action"]) for e, kw in log.lines if "alert_action" in kw]
    assert actions == [("alert.enforce.drift_detected", "trigger"), ("alert.enforce.drift_detected", "repeat"),
                       ("alert.enforce.drift_repaired", "resolve"), ("alert.node.certificate_expiring", "ignored"),
                       ("alert.enforce.apply_failed", "trigger"), ("alert.enforce.apply_recovered", "resolve")]
    assert len(wakes) == 4 and s.pipeline.open_alerts() == []


def test_expiry_warns_at_a_quarter_left_escalates_at_expiry_and_resolves_on_renewal(tmp_path: Path) -> None:
    s, _, _ = sender(tmp_path)
    cert = SimpleNamespace(cert_id="c1", not_before=T0, not_after=T0 + 100 * DAY)
    policy = SimpleNamespace(serial=7, issued_at=T0, expires_at=T0 + 8 * DAY)
    sent = []
    for hour in range(0, 101 * 24):  # checked hourly (the job runs every 30 s; repeats are silent anyway)
        now = T0 + hour * 3600
        state = "stale" if now > policy.expires_at else "fresh"
        sent += s.check_expiry(cert, policy, state, now)  # type: ignore[arg-type]
    assert [(e.check, e.action, e.severity) for e in sent] == [
        ("policy.expiring", "trigger", "warning"),  # 2 days (25% of 8) before expiry
        ("policy.expiring", "trigger", "critical"),
        ("policy.stale", "trigger", "error"),
        ("node.certificate_expiring", "trigger", "warning"),  # 25 days before
        ("node.certificate_expiring", "trigger", "critical")]
    assert sent[0].at == T0 + 6 * DAY and sent[3].at == T0 + 75 * DAY
    renewed_cert = SimpleNamespace(cert_id="c2", not_before=T0 + 101 * DAY, not_after=T0 + 465 * DAY)
    renewed = SimpleNamespace(serial=8, issued_at=T0 + 101 * DAY, expires_at=T0 + 108 * DAY)
    out = s.check_expiry(renewed_cert, renewed, "fresh", T0 + 101 * DAY + 60)  # type: ignore[arg-type]
    assert sorted((e.check, e.action) for e in out) == [
        ("node.certificate_expiring", "resolve"), ("policy.expiring", "resolve"), ("policy.stale", "resolve")]


def test_nft_monitor_lines_that_touch_our_table() -> None:
    assert touches_table("delete table inet policymesh", "policymesh")
    assert touches_table("delete chain inet policymesh input", "policymesh")
    assert touches_table("add rule inet policymesh input tcp dport 22 accept", "policymesh")
    assert touches_table("flush ruleset", "policymesh")
    assert not touches_table("delete table inet other", "policymesh")
    assert not touches_table("# new generation 6 by process 26049 (nft)", "policymesh")
    assert not touches_table("", "policymesh")


def test_the_watcher_triggers_on_our_table_and_restarts_a_dead_monitor(monkeypatch: Any) -> None:
    import meshnode.daemon.ruleset_watch as rw

    monkeypatch.setattr(rw, "RESTART_MIN_S", 0.05)
    script = "print('add table inet other'); print('delete table inet policymesh', flush=True)"
    changes: list[int] = []
    watch = RulesetWatch("policymesh", lambda: changes.append(1), Log(), command=(sys.executable, "-c", script))

    async def main() -> None:
        task = asyncio.create_task(watch.run())
        for _ in range(200):
            if len(changes) >= 2:  # the monitor exited after its lines and was started again
                break
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(main())
    assert len(changes) >= 2 and watch.changes_seen == len(changes)


def test_the_watcher_checks_a_burst_of_lines_once() -> None:
    """One load of our table prints a line per set and rule: one drift check for the burst, not one per line
    (a check per line kept nodes busy for seconds after every apply); a later change is checked again."""
    script = ("import sys, time\n"
              "for i in range(200): print(f'add rule inet policymesh input tcp dport {i} accept')\n"
              "sys.stdout.flush(); time.sleep(0.5)\n"
              "print('delete table inet policymesh', flush=True); time.sleep(5)\n")
    changes: list[int] = []
    watch = RulesetWatch("policymesh", lambda: changes.append(1), Log(), command=(sys.executable, "-c", script))

    async def main() -> None:
        task = asyncio.create_task(watch.run())
        for _ in range(300):
            if watch.changes_seen == 201 and len(changes) >= 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert watch.changes_seen == 201 and changes == [1, 1]


def test_peers_gauge_counts_open_channels_and_other_members_by_liveness() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    members = [{"node_id": "me", "liveness": "alive"}, {"node_id": "n2", "liveness": "alive"},
               {"node_id": "n3", "liveness": "suspect"}, {"node_id": "n4", "liveness": "dead"}]
    m.observe_peers(1, members, "me")
    m.observe_peers(2, members[:3], "me")  # n4 left the table: no stale "dead" sample
    text = generate_latest(m.registry).decode()
    assert 'policymesh_peers{state="connected"} 2.0' in text
    assert 'policymesh_peers{state="alive"} 1.0' in text and 'policymesh_peers{state="suspect"} 1.0' in text
    assert 'state="dead"' not in text
