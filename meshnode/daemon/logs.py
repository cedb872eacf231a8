"""What the daemon does about its own log volume: per-key budgets for messages a peer can trigger, and
a count (in metrics) of what aiohttp and asyncio log."""

from __future__ import annotations

import logging

from protocol.channel import HandshakeRateLimiter

from ..metrics import Metrics

LIBRARY_LOGGERS = ("aiohttp", "asyncio")


class LogBudget:
    """Token bucket per log key, counting what it suppressed. Unauthenticated peers must not be able to
    flood the log: refusals are counted in metrics always, logged at most a few times a second per key,
    with the number suppressed in between reported on the next line that passes."""

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


class LibraryLogCounter(logging.Handler):
    """Counts the warnings and errors aiohttp and asyncio log (the root handler renders them as JSON)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self._metrics.library_log_records.labels(record.name, record.levelname.lower()).inc()

    def install(self) -> None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(self)

    def uninstall(self) -> None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(self)
