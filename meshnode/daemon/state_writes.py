"""State writes that survive a failing disk: a failed write is kept (the latest per key) and retried
with backoff, with one alert per episode; the node keeps enforcing what it accepted meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from protocol.trust import TrustedState

from .. import transport
from ..metrics import Metrics
from .logs import LogBudget

RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


class StateWriter:
    def __init__(self, trust: TrustedState, metrics: Metrics, log: Any, log_budget: LogBudget,
                 alert: Callable[[str, dict[str, Any]], None]) -> None:
        self._trust = trust
        self._metrics = metrics
        self._log = log
        self._log_budget = log_budget
        self._alert = alert
        # Writes that failed, latest per key ("policy", "root.<v>", "members").
        self._unsaved: dict[str, tuple[str, Callable[[], None]]] = {}
        self._last_error: str | None = None
        self.retry_at: float | None = None  # time.monotonic() of the next retry, while writes are pending
        self._backoff_s = RETRY_MIN_S
        self._alerted = False

    def persist(self, key: str, kind: str, write: Callable[[], None]) -> None:
        """Write one piece of state now; when the write fails (EMFILE, ENOSPC, EIO, a read-only disk),
        keep it as the latest pending write for `key`, to be retried by :meth:`retry` with backoff."""
        self._unsaved.pop(key, None)
        try:
            write()
        except OSError as exc:
            self._unsaved[key] = (kind, write)
            self._failed(kind, exc)
        self._metrics.state_unsaved.set(len(self._unsaved))

    def not_durable(self) -> str | None:
        """Why the trusted policy or root is not on disk yet (a pending write's error), or None when it is.
        An operator's publish is acknowledged only when this is None: an acknowledged version must survive
        a crash."""
        if any(kind in ("policy", "root") for kind, _ in self._unsaved.values()):
            return self._last_error or "write pending"
        return None

    def _failed(self, kind: str, exc: OSError) -> None:
        self._metrics.state_write_failures.labels(kind).inc()
        error = f"{type(exc).__name__}: {exc.strerror or exc}"[:200]
        self._last_error = error
        if self._log_budget.allow("state.write_failed", transport.now_ms()):
            self._log.error("state.write_failed", kind=kind, error=error, retry_in_s=self._backoff_s,
                            suppressed=self._log_budget.take_suppressed("state.write_failed"))
        if not self._alerted:  # one alert per episode, until every pending write succeeded
            self._alerted = True
            self._alert("state.write_failed", {"kind": kind, "error": error, "durable": False,
                                               "note": "enforcing, but a restart would lose this state; retrying"})
        if self.retry_at is None:
            self.retry_at = time.monotonic() + self._backoff_s

    def retry(self) -> None:
        """Retry every pending write once its backoff has passed (a job of the scheduler)."""
        if self.retry_at is None or time.monotonic() < self.retry_at:
            return
        self.retry_at = None
        for key, (kind, write) in list(self._unsaved.items()):
            try:
                write()
            except OSError as exc:
                self._backoff_s = min(RETRY_MAX_S, self._backoff_s * 2)
                self._failed(kind, exc)
                break
            if self._unsaved.get(key, (None, None))[1] is write:
                del self._unsaved[key]
        self._metrics.state_unsaved.set(len(self._unsaved))
        if not self._unsaved:
            self._backoff_s = RETRY_MIN_S
            if self._alerted:
                self._alerted = False
                self._log.warning("state.write_recovered", serial=self._trust.serial)
                self._alert("state.write_recovered", {"serial": self._trust.serial})
