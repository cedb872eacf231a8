"""The alert pipeline: lifecycle on a virtual clock, the outbox on disk, and the real delivery worker
against a strict local PagerDuty Events v2 receiver (tests/pagerduty_receiver.py)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshnode.alerting import (
    AlertBook,
    AlertPipeline,
    Destination,
    Outbox,
    RateBudget,
    TransientAlerts,
    dedup_key,
    expiry_severity,
    pagerduty_body,
    route_alert,
    webhook_body,
)
from meshnode.alerting.delivery import Backoff
from meshnode.alerting.model import AlertEvent
from meshnode.config import ConfigError, load_config, render_config
from meshnode.metrics import Metrics
from tests.pagerduty_receiver import Receiver, free_port, pagerduty_errors, webhook_errors

ROUTING_KEY = "R0123456789abcdefABCDEF012345678"
assert len(ROUTING_KEY) == 32
SAFE_KEY = re.compile(r"\A[A-Za-z0-9%._:@+=,~/-]+\Z")
T0 = 1_700_000_000.0


class RecordingLog:
    """A structlog-shaped logger that keeps (level, event, facts)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> RecordingLog:
        return self

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **facts: self.records.append((level, event, facts))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [facts for _, event, facts in self.records if event == name]


class VirtualClock:
    """Monotonic time that only moves when the worker sleeps; a sleep past ``limit`` parks forever."""

    def __init__(self, limit: float = math.inf) -> None:
        self.t = 0.0
        self.limit = limit
        self.sleeps: list[float] = []
        self.parked = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.t + seconds > self.limit:
            self.parked.set()
            await asyncio.Event().wait()
        self.t += seconds
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


def make_pipeline(directory: Path, destinations: list[Destination], metrics: Metrics | None = None,
                  **outbox_bounds: int) -> AlertPipeline:
    log = RecordingLog()
    outbox = Outbox(directory, [d.id for d in destinations], log=log, **outbox_bounds)
    return AlertPipeline(AlertBook("prod", "node-1"), outbox, destinations, log=log, metrics=metrics)


# -- lifecycle (pure, virtual wall clock) ----------------------------------------------------------------
def test_a_condition_triggers_once_stays_silent_while_it_holds_and_resolves_when_it_clears() -> None:
    book = AlertBook("prod", "node-1")
    first = book.raise_("enforce.drift", "table policymesh", "critical", "ruleset drifted", {"diff": 3}, T0)
    assert [(e.action, e.severity, e.opens_episode) for e in first] == [("trigger", "critical", True)]
    for second in range(1, 3601):  # the condition holds for an hour, re-checked every second
        assert book.raise_("enforce.drift", "table policymesh", "critical", "still drifted", None, T0 + second) == [], \
            f"a repeat of an open alert must send nothing (second {second})"
    alert = book.get("enforce.drift", "table policymesh")
    assert alert is not None and alert.occurrences == 3601 and alert.summary == "ruleset drifted"
    resolved = book.resolve("enforce.drift", "table policymesh", T0 + 3601)
    assert [(e.action, e.dedup_key) for e in resolved] == [("resolve", first[0].dedup_key)]
    assert book.resolve("enforce.drift", "table policymesh", T0 + 3602) == [], "a second resolve sends nothing"
    again = book.raise_("enforce.drift", "table policymesh", "critical", "drifted again", None, T0 + 4000)
    assert [e.action for e in again] == ["trigger"] and again[0].dedup_key == first[0].dedup_key, \
        "a new episode re-triggers under the same dedup key"
    assert len(book) == 1 and book.open_counts() == {("enforce.drift", "critical"): 1}


def test_only_a_higher_severity_retriggers_an_open_alert() -> None:
    book = AlertBook("prod", "node-1")
    assert [e.severity for e in book.raise_("policy.expiring", "", "warning", "w", None, T0)] == ["warning"]
    assert book.raise_("policy.expiring", "", "info", "lower", None, T0 + 1) == [], "lower severity: silent"
    assert book.raise_("policy.expiring", "", "warning", "same", None, T0 + 2) == [], "same severity: silent"
    up = book.raise_("policy.expiring", "", "critical", "expired", None, T0 + 3)
    assert [(e.action, e.severity, e.opens_episode) for e in up] == [("trigger", "critical", False)]
    assert book.raise_("policy.expiring", "", "error", "lower again", None, T0 + 4) == []
    assert book.open_alerts()[0].severity == "critical"
    with pytest.raises(ValueError, match="severity"):
        book.raise_("x", "", "fatal", "bad", None, T0)  # type: ignore[arg-type]


def test_dedup_keys_are_stable_safe_injective_and_at_most_255_characters() -> None:
    key = dedup_key("prod", "node-1", "enforce.drift", "table policymesh")
    assert key == "policymesh/prod/node-1/enforce.drift/table%20policymesh"
    assert dedup_key("prod", "node-1", "policy.stale", "") == "policymesh/prod/node-1/policy.stale"
    assert dedup_key("c", "n", "abuse", "10.0.0.0/8") != dedup_key("c", "n", "abuse", "10.0.0.0_8")
    assert dedup_key("c", "n", "abuse", "a/b").count("/") == 4, "a subject's '/' never adds a segment"
    long_a, long_b = dedup_key("c", "n", "port", "x" * 1000), dedup_key("c", "n", "port", "x" * 999 + "y")
    assert long_a != long_b and len(long_a) <= 255 and "sha256:" in long_a
    huge = dedup_key("c" * 300, "n", "check", "s")
    assert len(huge) <= 255 and huge.startswith("policymesh/sha256:")
    for k in (key, long_a, huge, dedup_key("c", "n", "ports", "tcp/22 \u00e9\n\"'")):
        assert SAFE_KEY.match(k), f"unsafe characters in {k!r}"


def test_one_shot_findings_trigger_once_per_episode_and_resolve_after_a_quiet_period() -> None:
    alerts = TransientAlerts(AlertBook("prod", "node-1"), quiet_s=600)
    assert [e.action for e in alerts.note("policy.rejected", "peer:n2", "warning", "bad sig", None, T0)] == ["trigger"]
    for i in range(1, 50):  # the peer keeps offering the bad policy every 10 s
        assert alerts.note("policy.rejected", "peer:n2", "warning", "bad sig", None, T0 + 10 * i) == []
    assert alerts.next_deadline() == T0 + 490 + 600, "each repeat extends the episode"
    assert alerts.handle_timer(T0 + 1000) == [], "not quiet long enough yet"
    done = alerts.handle_timer(T0 + 1090)
    assert [e.action for e in done] == ["resolve"] and alerts.next_deadline() is None
    assert [e.action for e in alerts.note("policy.rejected", "peer:n2", "warning", "x", None, T0 + 2000)] == ["trigger"]
    other = alerts.note("policy.rejected", "peer:n3", "warning", "x", None, T0 + 2001, quiet_s=5)
    assert [e.subject for e in other] == ["peer:n3"] and alerts.next_deadline() == T0 + 2006


def test_the_book_is_bounded_and_says_so_with_one_overflow_alert() -> None:
    book = AlertBook("prod", "node-1", max_open=3)
    events = [e for i in range(10) for e in book.raise_("abuse", f"10.0.0.{i}", "warning", "flood", None, T0 + i)]
    assert [e.check for e in events] == ["abuse"] * 3 + ["alerting.overflow"], \
        "beyond max_open: one overflow alert, not one per refused condition"
    assert book.refused == 7 and len(book) == 4
    resolved = book.resolve("abuse", "10.0.0.0", T0 + 20)
    assert [(e.check, e.action) for e in resolved] == [("abuse", "resolve"), ("alerting.overflow", "resolve")]


def test_expiry_lead_time_warns_at_25_percent_left_and_is_critical_once_expired() -> None:
    start, end = T0, T0 + 100 * 86400
    assert expiry_severity(start, end, start + 74 * 86400) is None
    assert expiry_severity(start, end, start + 75 * 86400) == "warning"
    assert expiry_severity(start, end, end) == "critical"
    book = AlertBook("prod", "node-1")
    sent = []
    for hour in range(0, 101 * 24):  # checked hourly over the whole validity period and past it
        now = start + hour * 3600
        sev = expiry_severity(start, end, now)
        sent += (book.raise_("node.certificate_expiring", "", sev, "cert", None, now) if sev
                 else book.resolve("node.certificate_expiring", "", now))
    assert [(e.action, e.severity) for e in sent] == [("trigger", "warning"), ("trigger", "critical")]


def test_core_alerts_are_routed_onto_the_lifecycle(tmp_path: Path) -> None:
    pipe = make_pipeline(tmp_path, [])
    events = []
    for i in range(8640):  # the core's certificate_expiring repeats every 10 s for a day
        events += route_alert(pipe, "node.certificate_expiring", {"not_after": T0 + 86400}, T0 + 10 * i)
    # The daemon's expiry job owns the condition (lead time, see AlertSender.check_expiry): not one page.
    assert events == [], "the core's repeats page nothing, not 8,640 times a day"
    events = route_alert(pipe, "policy.not_enforced", {"trusted_serial": 5}, T0)
    events += route_alert(pipe, "policy.not_enforced.resolved", {"serial": 5}, T0 + 30)
    assert [(e.check, e.action, e.severity) for e in events] == [
        ("policy.not_enforced", "trigger", "critical"), ("policy.not_enforced", "resolve", "critical")]
    events = route_alert(pipe, "policy.rejected", {"source": "peer:n2", "reason": "signature"}, T0)
    assert events[0].subject == "peer:n2" and "reason=signature" in events[0].summary
    assert route_alert(pipe, "some.new_core_event", {}, T0)[0].severity == "warning", "unknown: never lost"
    drift = {"backend": "file", "table": "policymesh", "expected": "a", "actual": "b"}
    events = route_alert(pipe, "enforce.drift_detected", drift, T0)
    events += route_alert(pipe, "enforce.drift_detected", drift, T0 + 30)  # the timer sees it again
    events += route_alert(pipe, "enforce.drift_repaired", drift, T0 + 31)
    assert [(e.dedup_key, e.action) for e in events] == [
        ("policymesh/prod/node-1/enforce.drift/policymesh", "trigger"),
        ("policymesh/prod/node-1/enforce.drift/policymesh", "resolve")], "drift: resolved when repaired"
    events = route_alert(pipe, "state.write_failed", {"kind": "policy"}, T0)
    events += route_alert(pipe, "state.write_recovered", {}, T0 + 5)
    assert [(e.check, e.action) for e in events] == [("state.write_failed", "trigger"),
                                                     ("state.write_failed", "resolve")]


def test_open_alerts_survive_a_restart_so_what_cleared_meanwhile_is_resolved(tmp_path: Path) -> None:
    dests = [Destination.pagerduty("http://127.0.0.1:9/v2/enqueue", ROUTING_KEY)]
    first = make_pipeline(tmp_path, dests)
    first.raise_("enforce.drift", "policymesh", "critical", "drift", {"n": 1}, T0)
    first.raise_("policy.stale", "", "warning", "stale", None, T0)
    first.note("policy.rejected", "peer:n2", "warning", "bad", None, T0, quiet_s=100)
    assert (tmp_path / "open.json").stat().st_mode & 0o777 == 0o600
    second = make_pipeline(tmp_path, dests)  # restarted
    assert [a.check for a in second.open_alerts()] == ["enforce.drift", "policy.rejected", "policy.stale"]
    assert second.raise_("enforce.drift", "policymesh", "critical", "still", None, T0 + 50) == [], \
        "a condition that still holds after the restart stays silent"
    assert [e.action for e in second.resolve("policy.stale", "", T0 + 60)] == ["resolve"], \
        "a condition that cleared while the daemon was down is resolved"
    assert second.next_deadline() == T0 + 100
    assert [(e.check, e.action) for e in second.handle_timer(T0 + 100)] == [("policy.rejected", "resolve")]
    assert [a.check for a in make_pipeline(tmp_path, dests).open_alerts()] == ["enforce.drift"]
    (tmp_path / "open.json").write_bytes(b"[{")
    assert make_pipeline(tmp_path, dests).open_alerts() == [], "a damaged file starts empty, never crashes"


# -- request bodies --------------------------------------------------------------------------------------
def _event(action: str = "trigger", **kw: Any) -> AlertEvent:
    fields: dict[str, Any] = dict(action=action, dedup_key=dedup_key("prod", "node-1", "enforce.drift", "t"),
                                  cluster="prod", node="node-1", check="enforce.drift", subject="t",
                                  severity="critical", summary="ruleset drifted", at=T0 + 0.25,
                                  details={"rules": 3}, opens_episode=action == "trigger")
    fields.update(kw)
    return AlertEvent(**fields)


def test_pagerduty_bodies_follow_events_v2_exactly() -> None:
    body = pagerduty_body(_event(), ROUTING_KEY)
    assert pagerduty_errors(body) == []
    assert set(body) == {"routing_key", "event_action", "dedup_key", "payload", "client"}
    assert body["payload"] == {
        "summary": "ruleset drifted", "source": "node-1", "severity": "critical",
        "timestamp": "2023-11-14T22:13:20.250+00:00", "component": "enforce", "group": "prod",
        "class": "enforce.drift",
        "custom_details": {"rules": 3, "cluster": "prod", "node": "node-1", "check": "enforce.drift", "subject": "t"},
    }
    resolve = pagerduty_body(_event("resolve"), ROUTING_KEY)
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": body["dedup_key"]}
    assert pagerduty_errors(resolve) == []
    book = AlertBook("prod", "node-1")
    long = book.raise_("x.y", "s" * 5000, "info", "word " * 2000, {"blob": "z" * 100_000}, T0)[0]
    body = pagerduty_body(long, ROUTING_KEY)
    assert pagerduty_errors(body) == [], "long summaries, subjects and details are clipped to the limits"
    assert len(json.dumps(body)) < 16_000
    assert pagerduty_errors({**body, "extra": 1}) == ["unknown field 'extra'"], "the receiver is strict"


def test_webhook_bodies_carry_the_same_facts_in_our_schema() -> None:
    body = webhook_body(_event())
    assert webhook_errors(body) == []
    assert body["action"] == "trigger" and body["check"] == "enforce.drift" and body["first"] is True
    assert webhook_errors(webhook_body(_event("resolve"))) == []


# -- outbox ----------------------------------------------------------------------------------------------
def test_the_outbox_keeps_events_in_order_across_a_restart(tmp_path: Path) -> None:
    log = RecordingLog()
    box = Outbox(tmp_path, ["pagerduty", "hook"], log=log)
    seqs = [box.append(_event(summary=f"e{i}")) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5] and box.unwritten == 5 and not list(tmp_path.glob("0*.json"))
    assert box.flush() == 5 and box.unwritten == 0
    assert all(oct(os.stat(tmp_path / f"{s:016d}.json").st_mode & 0o777) == "0o600" for s in seqs)
    first = box.next_event("pagerduty")
    assert first is not None
    box.ack("pagerduty", first.seq)
    assert len(box) == 5, "an event stays until every destination took it"
    box.ack("hook", 2)
    assert len(box) == 4 and not (tmp_path / f"{1:016d}.json").exists()
    box.append(_event(summary="never flushed"))  # the process dies before the worker woke up
    again = Outbox(tmp_path, ["pagerduty", "hook"], log=log)
    assert [s.event.summary for s in again.events()] == ["e1", "e2", "e3", "e4"]
    assert again.pending("pagerduty") == 4 and again.pending("hook") == 3
    assert again.append(_event()) == 6, "sequence numbers keep increasing after a restart"


def test_a_full_outbox_drops_old_low_severity_triggers_first_and_never_an_open_alerts_resolve(tmp_path: Path) -> None:
    box = Outbox(tmp_path, ["pagerduty"], log=RecordingLog(), max_events=4)
    delivered = box.append(_event(dedup_key="k-open", severity="warning"))  # the receiver has this one
    assert delivered is not None and box.next_event("pagerduty") is not None
    box.append(_event("resolve", dedup_key="k-open", severity="warning"))
    box.append(_event(dedup_key="k-err", severity="error"))
    box.append(_event(dedup_key="k-info", severity="info"))
    assert box.append(_event(dedup_key="k-crit", severity="critical")) is not None
    assert [s.event.dedup_key for s in box.events()] == ["k-open", "k-open", "k-err", "k-crit"], \
        "the untaken info trigger went first; the trigger being sent and the resolve stayed"
    assert box.append(_event(dedup_key="k-warn", severity="warning")) is None, \
        "a new warning is dropped rather than an older error/critical"
    assert box.append(_event(dedup_key="k-crit2", severity="critical")) is not None
    assert [s.event.dedup_key for s in box.events()] == ["k-open", "k-open", "k-crit", "k-crit2"]
    for i in range(3):
        box.append(_event("resolve", dedup_key=f"r{i}"))
    assert sum(s.event.action == "resolve" for s in box.events()) == 4, "resolves are never dropped"
    assert box.dropped == 5  # k-info, k-warn, k-err, then k-crit and k-crit2 to make room for resolves


def test_a_dropped_episode_takes_its_resolve_with_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path, ["pagerduty"], log=RecordingLog(), max_events=3)
    box.append(_event(dedup_key="a", severity="info"))
    box.append(_event("resolve", dedup_key="a", severity="info"))
    box.append(_event(dedup_key="b", severity="error"))
    box.append(_event(dedup_key="c", severity="error"))
    assert [(s.event.dedup_key, s.event.action) for s in box.events()] == [("b", "trigger"), ("c", "trigger")]
    assert box.dropped == 2


def test_corrupt_outbox_files_are_set_aside_counted_and_skipped(tmp_path: Path) -> None:
    box = Outbox(tmp_path, ["pagerduty"], log=RecordingLog())
    for i in range(3):
        box.append(_event(summary=f"e{i}"))
    box.flush()
    (tmp_path / f"{2:016d}.json").write_bytes(b'{"action": "trigger", "trunc')
    (tmp_path / "cursors.json").write_bytes(b"\x00garbage")
    (tmp_path / f"{9:016d}.json").write_bytes(b"x" * 100_000)
    log = RecordingLog()
    again = Outbox(tmp_path, ["pagerduty"], log=log)
    assert [s.event.summary for s in again.events()] == ["e0", "e2"]
    assert again.corrupt == 3 and len(log.events("alert.outbox_corrupt")) == 3
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [f"{2:016d}.json", f"{9:016d}.json",
                                                                        "cursors.json"]
    assert again.append(_event()) == 10


# -- configuration ---------------------------------------------------------------------------------------
BASE = render_config(cluster="c", node_id="n1", region="r1", listen="127.0.0.1:7946", advertise="127.0.0.1:7946",
                     seeds=[], admin_listen="127.0.0.1:9946")


def _config(tmp_path: Path, alerts: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(BASE + "\n[alerts]\n" + alerts)
    return p


def test_the_pagerduty_key_file_must_be_private_and_hold_a_key(tmp_path: Path, capsys: Any) -> None:
    from meshnode.cli.meshnode import main

    key = tmp_path / "pd.key"
    cfg = _config(tmp_path, 'pagerduty_routing_key_file = "pd.key"\n')
    with pytest.raises(ConfigError, match="cannot read .*pd.key"):
        load_config(cfg)
    key.write_text(ROUTING_KEY + "\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644.*chmod 600"):
        load_config(cfg)
    assert main(["check-config", "--config", str(cfg)]) == 1
    assert "pagerduty_routing_key_file" in capsys.readouterr().err, "check-config reports the unsafe key file"
    key.write_text("")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        load_config(cfg)
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="32 letters and digits"):
        load_config(cfg)
    key.write_text(ROUTING_KEY + "\n")
    lc = load_config(cfg)
    assert lc.pagerduty_routing_key() == ROUTING_KEY
    assert lc.cfg.alerts.pagerduty_url == "https://events.pagerduty.com/v2/enqueue"
    assert load_config(_config(tmp_path, "")).pagerduty_routing_key() is None, "empty: PagerDuty off"
    with pytest.raises(ConfigError, match="pagerduty_url"):
        load_config(_config(tmp_path, 'pagerduty_url = "ftp://x"\n'))


def test_the_pipeline_built_from_config_stores_its_outbox_in_the_state_dir(tmp_path: Path) -> None:
    (tmp_path / "pd.key").write_text(ROUTING_KEY)
    (tmp_path / "pd.key").chmod(0o600)
    lc = load_config(_config(tmp_path, 'pagerduty_routing_key_file = "pd.key"\nwebhook_urls = ["http://h/x"]\n'))
    pipe = AlertPipeline.from_config(lc, "n1", log=RecordingLog(), metrics=Metrics())
    assert [d.kind for d in pipe.destinations] == ["pagerduty", "webhook"]
    assert pipe.outbox.directory == tmp_path / "state" / "alerts-outbox"
    pipe.raise_("enforce.drift", "", "critical", "drift", None, T0)
    assert len(pipe.outbox) == 1 and pipe.outbox.events()[0].event.dedup_key == "policymesh/c/n1/enforce.drift"


# -- delivery against the strict receiver ---------------------------------------------------------------
def test_budget_and_backoff_are_pure_and_bounded() -> None:
    budget = RateBudget(2.0, 20, now=0.0)
    assert sum(budget.take(0.0) == 0 for _ in range(100)) == 20, "the burst"
    assert budget.take(0.0) == pytest.approx(0.5)
    assert sum(budget.take(t / 10) == 0 for t in range(1, 101)) == 20, "2 per second afterwards"
    backoff = Backoff(random.Random(7), base_s=1.0, max_s=300.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(min(300.0, 2**n) / 2 <= d <= min(300.0, 2**n) for n, d in enumerate(delays)), delays


def test_trigger_then_silence_while_it_holds_then_one_resolve_reach_the_receiver(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = await Receiver().start()
        metrics = Metrics()
        pipe = make_pipeline(tmp_path, [Destination.pagerduty(receiver.pagerduty_url, ROUTING_KEY),
                                        Destination.webhook(receiver.webhook_url)], metrics)
        clock = VirtualClock()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(pipe.deliver(session, clock=clock.now, sleep=clock.sleep))
            try:
                pipe.raise_("enforce.drift", "policymesh", "critical", "ruleset drifted", {"rules": 2}, T0)
                await until(lambda: len(receiver.events) == 1 and len(receiver.webhooks) == 1, "the trigger")
                for s in range(1, 61):  # the condition holds for a minute
                    pipe.raise_("enforce.drift", "policymesh", "critical", "still drifted", None, T0 + s)
                await asyncio.sleep(0.2)
                assert len(receiver.events) == 1, f"no event while the condition holds: {receiver.events}"
                pipe.resolve("enforce.drift", "policymesh", T0 + 61)
                # the receiver counts a post before the sender has its answer: wait for the cursor too
                await until(lambda: len(receiver.events) == 2 and len(receiver.webhooks) == 2
                            and len(pipe.outbox) == 0, "the resolve, acknowledged")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await receiver.stop()
        assert receiver.rejected == [], f"the strict receiver refused: {receiver.rejected}"
        assert [(e["event_action"], e["dedup_key"]) for e in receiver.events] == [
            ("trigger", "policymesh/prod/node-1/enforce.drift/policymesh"),
            ("resolve", "policymesh/prod/node-1/enforce.drift/policymesh")]
        assert [w["action"] for w in receiver.webhooks] == ["trigger", "resolve"]
        assert len(pipe.outbox) == 0 and sorted(p.name for p in tmp_path.glob("*.json")) == ["cursors.json", "open.json"]
        assert json.loads((tmp_path / "open.json").read_bytes()) == [], "nothing open after the resolve"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in metrics.registry.collect() for s in m.samples}
        assert samples[("policymesh_alert_deliveries_total",
                        (("destination", "pagerduty"), ("result", "delivered")))] == 2
        assert samples[("policymesh_alert_outbox_events", ())] == 0
        assert not any(name == "policymesh_alerts_open" for name, _ in samples), "the resolved alert left no sample"

    asyncio.run(scenario())


def test_events_raised_while_the_receiver_is_down_survive_a_restart_and_arrive_once_in_order(tmp_path: Path) -> None:
    port = free_port()
    dests = [Destination.pagerduty(f"http://127.0.0.1:{port}/v2/enqueue", ROUTING_KEY),
             Destination.webhook(f"http://127.0.0.1:{port}/webhook")]

    async def scenario() -> None:
        first = make_pipeline(tmp_path, dests)
        clock = VirtualClock()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(first.deliver(session, clock=clock.now, sleep=clock.sleep,
                                                     rng=random.Random(1)))
            first.raise_("enforce.drift", "policymesh", "critical", "drift", None, T0)
            first.raise_("policy.stale", "", "warning", "stale", None, T0 + 1)
            first.resolve("enforce.drift", "policymesh", T0 + 2)
            first.raise_("enforce.drift", "policymesh", "critical", "drift again", None, T0 + 3)
            await until(lambda: clock.t >= 30, "30 s of (virtual) receiver downtime")
            assert first.delivery is not None and first.delivery.counts[("pagerduty", "delivered")] == 0
            assert first.delivery.counts[("pagerduty", "failed")] >= 4, "connection refused: retried with backoff"
            task.cancel()  # the daemon stops while the receiver is still down
            await asyncio.gather(task, return_exceptions=True)
        assert len(first.outbox) == 4

        receiver = await Receiver(port=port).start()
        second = make_pipeline(tmp_path, dests)  # the restarted daemon: same state dir, new objects
        assert len(second.outbox) == 4, "the pending events were loaded from disk"
        clock = VirtualClock()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(second.deliver(session, clock=clock.now, sleep=clock.sleep))
            try:
                await until(lambda: len(second.outbox) == 0, "the outbox to drain")
                await asyncio.sleep(0.2)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await receiver.stop()
        expected = [("trigger", "enforce.drift"), ("trigger", "policy.stale"), ("resolve", "enforce.drift"),
                    ("trigger", "enforce.drift")]
        got = [(e["event_action"], e["dedup_key"].split("/")[3]) for e in receiver.events]
        assert got == expected, f"PagerDuty must get every event once, in order: {got}"
        assert [(w["action"], w["check"]) for w in receiver.webhooks] == expected
        assert receiver.rejected == []

    asyncio.run(scenario())


def test_a_storm_of_5000_alerts_is_bounded_by_the_outbox_and_the_rate_budget(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = await Receiver().start()
        metrics = Metrics()
        pipe = make_pipeline(tmp_path, [Destination.pagerduty(receiver.pagerduty_url, ROUTING_KEY)], metrics,
                             max_events=200)
        pipe.book.max_open = 10_000
        clock = VirtualClock(limit=30.0)
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(pipe.deliver(session, clock=clock.now, sleep=clock.sleep))
            try:
                await asyncio.sleep(0)
                assert pipe.delivery is not None
                for i in range(5000):  # within one loop iteration, as a burst of effects would
                    pipe.raise_("abuse.handshakes", f"198.51.{i // 256}.{i % 256}",
                                "critical" if i % 10 == 0 else "warning", "handshake flood", {"attempts": 100},
                                T0 + i / 1000)
                assert len(pipe.outbox) == 200 and pipe.outbox.dropped == 4800
                assert {s.event.severity for s in pipe.outbox.events()} == {"critical"}, "warnings dropped first"
                assert pipe.outbox.unwritten == 200, "nothing written yet: the storm costs 200 writes, not 5,000"
                queued = [s.event.dedup_key for s in pipe.outbox.events()]
                await asyncio.wait_for(clock.parked.wait(), 30)
                assert len(list(tmp_path.glob("0*.json"))) == 200 - len(receiver.events)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await receiver.stop()
        posts = len(receiver.requests)
        assert 20 + 2 * 29 <= posts <= 20 + 2 * 30, f"{posts} posts in 30 s: the budget is 2/s with a burst of 20"
        assert [e["dedup_key"] for e in receiver.events] == queued[:posts], "in order, each once"
        value = metrics.registry.get_sample_value("policymesh_alert_outbox_dropped_total")
        assert value == 4800

    asyncio.run(scenario())


def test_a_refused_event_is_dropped_and_counted_and_transient_failures_are_retried(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = await Receiver().start()
        metrics = Metrics()
        pipe = make_pipeline(tmp_path, [Destination.pagerduty(receiver.pagerduty_url, ROUTING_KEY)], metrics)
        bad = make_pipeline(tmp_path / "bad", [Destination.pagerduty(receiver.pagerduty_url, "short-key")])
        receiver.force = [400, 503, 429, 500]
        clock = VirtualClock()
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(p.deliver(session, clock=clock.now, sleep=clock.sleep)) for p in (pipe, bad)]
            try:
                pipe.raise_("a", "", "error", "refused by the receiver", None, T0)
                await until(lambda: receiver.force == [503, 429, 500], "the forced 400")
                pipe.raise_("b", "", "error", "accepted on the 4th try", None, T0 + 1)
                await until(lambda: len(receiver.events) == 1, "delivery after three transient failures")
                bad.raise_("c", "", "error", "invalid routing key", None, T0 + 2)
                await until(lambda: len(receiver.rejected) == 1, "the strict receiver's 400")
                await until(lambda: len(pipe.outbox) == 0 and len(bad.outbox) == 0, "both outboxes settled")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await receiver.stop()
        assert receiver.events[0]["dedup_key"].endswith("/b")
        assert [s for _, s in receiver.requests] == [400, 503, 429, 500, 202, 400], \
            f"a 400 is never retried, 5xx/429 are: {receiver.requests}"
        assert "routing_key" in receiver.rejected[0][1][0]
        assert pipe.delivery is None and len(pipe.outbox) == 0 and len(bad.outbox) == 0
        assert metrics.registry.get_sample_value(
            "policymesh_alert_deliveries_total", {"destination": "pagerduty", "result": "rejected"}) == 1
        assert metrics.registry.get_sample_value(
            "policymesh_alert_deliveries_total", {"destination": "pagerduty", "result": "failed"}) == 3
        assert len(clock.sleeps) == 3 and [lo <= d <= 2 * lo for lo, d in zip((0.5, 1, 2), clock.sleeps, strict=True)] \
            == [True] * 3, f"exponential backoff with jitter between the retries: {clock.sleeps}"
        rejected = bad.log.events("alert.delivery_rejected")  # type: ignore[attr-defined]
        assert rejected and rejected[0]["status"] == 400 and "routing_key" in rejected[0]["response"]

    asyncio.run(scenario())
