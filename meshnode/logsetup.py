"""structlog JSON logs with stable dotted event names; configured once by the entry point."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", stream=None) -> None:
    logging.basicConfig(format="%(message)s", stream=stream or sys.stderr, level=getattr(logging, level.upper()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
