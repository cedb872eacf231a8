"""systemd: the shipped unit verifies and scores, and a real daemon speaks the notify protocol faithfully.

No systemd runs here as PID 1, so the daemon's side is tested the way systemd's manager sees it: a real
`meshnode run` process with ``$NOTIFY_SOCKET`` (an AF_UNIX datagram socket this test binds) and
``$WATCHDOG_USEC`` in its environment. It must say READY=1 only once it serves and enforces its stored
policy (or has none, and says so), ping the watchdog from its event loop (a stopped process stops the
pings: what makes systemd restart a hung daemon), report each newly enforced serial in STATUS=, re-apply
its table on SIGHUP (what a reload of nftables.service propagates) and say STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from meshnode.daemon.readiness import Readiness
from meshnode.sdnotify import Notifier
from protocol.trust import PolicyVersion
from tests.daemon_helpers import Cluster, NodeProc, wait_until
from tests.fixtures import sample_document

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "meshnode.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (deploy/dev.sh installs the systemd package as root)")
WATCHDOG_USEC = 2_000_000  # the daemon pings every 1 s (half of it, as systemd advises)
MAX_EXPOSURE = 2.0


# -- the shipped unit ---------------------------------------------------------------------------------


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit as installed: in a root that has the system's units, the unit
    in /etc/systemd/system and the binaries its Exec lines name (stubs)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/meshnode.service")
    for stub in ("opt/policymesh/venv/bin/meshnode", "bin/kill"):
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", "meshnode.service"],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    """`systemd-analyze security` scores the unit offline. Its --threshold counts in tenths on systemd 252
    (20 means an exposure of 2.0; "2.0" does not parse there), so the score it prints is checked too."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                           str(UNIT)], capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found is not None, proc.stdout + proc.stderr
    assert proc.returncode == 0 and float(found.group(1)) <= MAX_EXPOSURE, proc.stdout[-2000:]


def test_unit_runs_as_a_notify_service_with_a_watchdog() -> None:
    """What the daemon implements is what the unit asks for."""
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "ReloadPropagatedFrom=nftables.service",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=policymesh", "StateDirectory=policymesh",
                 "CapabilityBoundingSet=CAP_NET_ADMIN", "AmbientCapabilities=CAP_NET_ADMIN"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert "Documentation=" not in text  # nothing the install steps install could be pointed to


# -- a real daemon on a notify socket -----------------------------------------------------------------


class NotifySocket:
    """The manager's end of sd_notify(3): one datagram per message, fields one per line."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="pm-notify-")  # short: AF_UNIX paths are limited to 107 bytes
        self.path = os.path.join(self._dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def receive(self, timeout_s: float) -> tuple[float, dict[str, str]] | None:
        """The next message (arrival time, fields), or None when nothing came within ``timeout_s``."""
        self._sock.settimeout(timeout_s)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return time.monotonic(), fields

    def wait_for(self, key: str, timeout_s: float, node: NodeProc | None = None) -> dict[str, str]:
        """Read messages until one carries ``key``; fail after ``timeout_s`` (a guard against hanging)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.receive(max(0.01, deadline - time.monotonic()))
            if got is not None and key in got[1]:
                return got[1]
        tail = node.log_text()[-3000:] if node is not None else ""
        raise AssertionError(f"no {key} within {timeout_s:.0f} s\n{tail}")

    def wait_for_status(self, prefix: str, timeout_s: float, node: NodeProc | None = None) -> dict[str, str]:
        """Read messages until a STATUS= line starts with ``prefix``."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.wait_for("STATUS", max(0.01, deadline - time.monotonic()), node)
            if got["STATUS"].startswith(prefix):
                return got

    def watchdog_pings(self, during_s: float) -> list[float]:
        """Arrival times of the WATCHDOG=1 messages received during the next ``during_s`` seconds."""
        pings = []
        deadline = time.monotonic() + during_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and got[1].get("WATCHDOG") == "1":
                pings.append(got[0])
        return pings

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


def test_a_stored_policy_that_fails_to_apply_delays_ready_until_an_apply_succeeds(notify: NotifySocket) -> None:
    """The daemon's readiness part alone: not ready while the stored policy is not enforced (the status
    says why), ready with the first successful apply, a STATUS= line for each later one."""
    readiness = Readiness(Notifier(notify.env()), structlog.get_logger("test"))
    document, revocations = sample_document()
    stored = PolicyVersion("testmesh", 7, 0, 86400, 1, document, revocations)
    readiness.started(stored, "nft -j -f - failed (exit 1): Operation not permitted")
    first = notify.wait_for("STATUS", 5)
    assert "READY" not in first and not readiness.ready
    assert first["STATUS"] == (f"not ready: stored serial {stored.serial} not enforced yet: "
                               "nft -j -f - failed (exit 1): Operation not permitted")
    readiness.enforced(stored.serial, "ab" * 32, 3)
    assert notify.wait_for("READY", 5) == {"READY": "1", "STATUS": f"enforcing serial {stored.serial} "
                                                                   f"(hash {'ab' * 6}...), 3 members"}
    readiness.enforced(stored.serial + 1, "cd" * 32, 4)
    assert notify.wait_for("STATUS", 5) == {"STATUS": f"enforcing serial {stored.serial + 1} "
                                                      f"(hash {'cd' * 6}...), 4 members"}
    job = readiness.watchdog_job()
    assert job is not None and job.interval_s == WATCHDOG_USEC / 2e6
    job.run()
    assert notify.wait_for("WATCHDOG", 5) == {"WATCHDOG": "1"}
    readiness.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ready_when_the_stored_policy_is_enforced_then_watchdog_status_reload_stopping(
        tmp_path: Path, notify: NotifySocket) -> None:
    cluster = Cluster(tmp_path, subnet=80)
    try:
        node = cluster.add_node("sd-1", "region-a")
        cluster.start([node])
        serial, data = cluster.sign()
        assert cluster.publish(node, data)["ok"]
        cluster.wait_serial(serial, [node])
        assert node.stop() == 0  # the policy is stored: the next start enforces it before anything else
        # Only SIGHUP may repair the ruleset in this test, not the drift check.
        node.config.write_text(node.config.read_text().replace("drift_check_s = 30", "drift_check_s = 3600"))

        node.extra_env = notify.env()
        node.start()
        ready = notify.wait_for("READY", 30, node)
        # READY=1 only once /readyz answers: the stored policy is enforced and the listeners are up.
        readyz = node.admin("/readyz")
        assert readyz is not None and readyz[0] == 200, readyz
        assert ready["READY"] == "1"
        assert re.fullmatch(rf"enforcing serial {serial} \(hash [0-9a-f]{{12}}\.\.\.\), \d+ members",
                            ready["STATUS"]), ready

        # WATCHDOG=1 keeps coming at about the interval (half of WATCHDOG_USEC).
        pings = notify.watchdog_pings(6.0)
        assert len(pings) >= 3, pings
        interval_s = WATCHDOG_USEC / 2e6
        assert 0.5 * interval_s <= statistics.median(b - a for a, b in zip(pings, pings[1:], strict=False)) \
            <= 1.5 * interval_s

        # A stopped process sends nothing (systemd would kill and restart it after WatchdogSec=) ...
        os.kill(node.pid, signal.SIGSTOP)
        try:
            notify.watchdog_pings(0.5)  # what was sent before the stop took effect
            assert notify.watchdog_pings(3 * interval_s) == []
        finally:
            os.kill(node.pid, signal.SIGCONT)
        # ... and pings again once it runs.
        assert len(notify.watchdog_pings(4 * interval_s)) >= 2

        # Each newly enforced serial is a STATUS= line.
        serial2, data2 = cluster.sign()
        assert cluster.publish(node, data2)["ok"]
        notify.wait_for_status(f"enforcing serial {serial2} ", 30, node)

        # SIGHUP (what a reload of nftables.service propagates) re-applies the table at once.
        ruleset = node.dir / "ruleset.nft"
        enforced = ruleset.read_text()
        ruleset.write_text("flush ruleset\n")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ruleset.read_text() == enforced, 20, "the ruleset re-applied after SIGHUP")
        assert node.alive

        # STOPPING=1 as soon as shutdown begins.
        node.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", 15, node)
        assert stopping["STOPPING"] == "1"
        assert node.proc.wait(15) == 0
    finally:
        cluster.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ready_without_a_policy_says_so(tmp_path: Path, notify: NotifySocket) -> None:
    cluster = Cluster(tmp_path, subnet=81)
    try:
        node = cluster.add_node("sd-2", "region-a")
        node.extra_env = notify.env()
        node.start()
        ready = notify.wait_for("READY", 30, node)
        assert ready["READY"] == "1" and ready["STATUS"].startswith("no policy yet"), ready
        readyz = node.admin("/readyz")
        assert readyz is not None and readyz[0] == 503  # serving, and nothing enforced: /readyz says so too

        serial, data = cluster.sign()
        assert cluster.publish(node, data)["ok"]
        status = notify.wait_for_status(f"enforcing serial {serial} ", 30, node)
        assert "READY" not in status  # READY=1 is said once
    finally:
        cluster.close()
