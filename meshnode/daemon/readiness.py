"""What the daemon tells its service manager (systemd's notify protocol, see :mod:`meshnode.sdnotify`).

* ``READY=1`` once the node has started (listeners up, gossip node running) and the stored policy is
  enforced — or at once when the node has no stored policy (it is ready to receive one; its ``STATUS=``
  says so). While the stored policy fails to apply the node is not ready, and its status says why.
* ``STATUS=`` on every change of what is enforced: "enforcing serial N (hash H...), M members".
* ``WATCHDOG=1`` as a job of the daemon's one scheduler, so the event loop itself sends it: a loop that
  stalls stops the pings, and systemd restarts the unit after ``WatchdogSec=``.
* ``STOPPING=1`` when shutdown begins.

Outside systemd (no ``$NOTIFY_SOCKET``) nothing is sent.
"""

from __future__ import annotations

from typing import Any

from protocol.trust import PolicyVersion

from ..sdnotify import Notifier
from .scheduler import Every


class Readiness:
    def __init__(self, notifier: Notifier, log: Any) -> None:
        self._notifier = notifier
        self._log = log
        self._started = False
        self._enforcing: str | None = None  # the status line of what the kernel enforces, once it does
        self.ready = False

    def watchdog_job(self) -> Every | None:
        """The scheduler job that pings the watchdog at half ``WatchdogSec=`` (None when systemd asked
        for no watchdog)."""
        interval_s = self._notifier.watchdog_interval_s
        return None if interval_s is None else Every("watchdog", interval_s, self._ping)

    def _ping(self) -> None:
        self._notifier.watchdog()

    def enforced(self, serial: int, policy_hash: str, members: int) -> None:
        """The kernel now enforces ``serial`` for ``members`` members (the enforcer's confirmation)."""
        self._enforcing = f"enforcing serial {serial} (hash {policy_hash[:12]}...), {members} members"
        if self.ready:
            self._notifier.status(self._enforcing)
        elif self._started:
            self._become_ready(self._enforcing)

    def started(self, stored_policy: PolicyVersion | None, apply_error: str | None) -> None:
        """The node serves: ready now if the stored policy is enforced or there is none; otherwise ready
        once an apply of it succeeds (:meth:`enforced`)."""
        self._started = True
        if self._enforcing is not None:
            self._become_ready(self._enforcing)
        elif stored_policy is None:
            self._become_ready("no policy yet: waiting for one from the mesh or an operator "
                               "(the host firewall is left as it is)")
        else:
            reason = f": {apply_error[:200]}" if apply_error else ""
            self._notifier.status(f"not ready: stored serial {stored_policy.serial} not enforced yet{reason}")

    def _become_ready(self, status: str) -> None:
        self.ready = True
        self._notifier.ready(status)
        self._log.info("meshnode.ready", status=status, notified=self._notifier.enabled)

    def stopping(self) -> None:
        self._notifier.stopping()

    def close(self) -> None:
        self._notifier.close()
