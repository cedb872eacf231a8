"""structlog JSON logs with stable dotted event names; configured once by the entry point.

Libraries that log through the standard library (aiohttp's ``aiohttp.server`` / ``aiohttp.web`` /
``aiohttp.access`` / ``aiohttp.websocket``, ``asyncio``) go through the same JSON renderer: a record
becomes ``{"event": "<logger>.<level>", "message": ..., "exception": "<traceback text>"}`` on one line,
never a plain-text traceback, and each (logger, message) is rate limited so a peer that makes aiohttp
complain cannot flood the log (the number suppressed is reported on the next line that passes).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

LIBRARY_LOG_PER_S = 2.0
LIBRARY_LOG_BURST = 10
_MAX_KEYS = 256


class LibraryLogBudget(logging.Filter):
    """Token bucket per (logger, message template); counts what it drops and reports it on the next
    record of that key that passes (field ``suppressed``)."""

    def __init__(self, per_s: float = LIBRARY_LOG_PER_S, burst: int = LIBRARY_LOG_BURST) -> None:
        super().__init__()
        self._per_s = per_s
        self._burst = float(burst)
        self._buckets: dict[tuple[str, str], tuple[float, float, int]] = {}  # key -> (tokens, at, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:120])
        now = time.monotonic()
        tokens, at, suppressed = self._buckets.get(key, (self._burst, now, 0))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now, suppressed + 1)
            return False
        if key not in self._buckets and len(self._buckets) >= _MAX_KEYS:
            self._buckets.pop(next(iter(self._buckets)))
        self._buckets[key] = (tokens - 1.0, now, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


def _library_event(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record's message becomes a field; its event name is ``<logger>.<level>``."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict["message"] = str(event_dict.get("event", ""))[:2000]
        event_dict["event"] = f"{record.name}.{record.levelname.lower()}"
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            event_dict["suppressed"] = suppressed
    return event_dict


def configure(level: str = "info", stream=None) -> None:
    out = stream or sys.stderr
    lvl = getattr(logging, level.upper())
    handler = logging.StreamHandler(out)
    handler.addFilter(LibraryLogBudget())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _library_event,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    ))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
