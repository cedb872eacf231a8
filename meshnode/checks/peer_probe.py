"""External validation, the I/O part: real TCP connection attempts from this node to a member.

    result = await probe_target(target, timeout_s=2.0, at=time.time())
    # ProbeResult("n2", "10.0.0.2", "10.0.0.1", at, (PortResult(9999, "refused", "closed"), ...))

Each attempt leaves from ``target.source`` (bound explicitly: the policy judges that address), completes
or fails the TCP handshake, and closes at once without sending anything; an ``open`` mesh port sees one
connection that ends before any HTTP request (nothing for its handshake-abuse check to count). The
outcomes are those of :mod:`meshnode.checks.probe_plan`: ``open``, ``closed`` (ECONNREFUSED: RST or ICMP
port-unreachable), ``filtered`` (no answer within the timeout, or ICMP host/net unreachable or
administratively prohibited) and ``error`` (our side failed: the source address is gone, our own output
filter refused it). A round's attempts run concurrently, at most ``MAX_CONCURRENT`` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from dataclasses import dataclass

from .probe_plan import CLOSED, ERROR, FILTERED, OPEN, ProbeTarget

MAX_CONCURRENT = 16
FILTERED_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


@dataclass(frozen=True, slots=True)
class PortResult:
    port: int
    expect: str  # probe_plan.REFUSED | REACHABLE | MESH
    outcome: str  # probe_plan.OPEN | CLOSED | FILTERED | ERROR
    detail: str = ""  # the error, for an ``error`` outcome


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe of one member: from ``source`` to ``host`` at wall-clock ``at``."""

    target: str
    host: str
    source: str
    at: float
    ports: tuple[PortResult, ...]


async def probe_port(host: str, port: int, source: str, timeout_s: float) -> tuple[str, str]:
    """One TCP connection attempt: (outcome, detail)."""
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except TimeoutError:
        return FILTERED, ""
    except ConnectionRefusedError:
        return CLOSED, ""
    except OSError as exc:
        if exc.errno in FILTERED_ERRNOS:
            return FILTERED, exc.strerror or ""
        return ERROR, f"{type(exc).__name__}: {exc.strerror or exc}"[:200]
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout_s):
            await writer.wait_closed()
    return OPEN, ""


async def probe_target(target: ProbeTarget, *, timeout_s: float, at: float,
                       limit: asyncio.Semaphore | None = None) -> ProbeResult:
    """Every planned port of ``target`` at once (bounded by ``limit``, default ``MAX_CONCURRENT``)."""
    sem = limit or asyncio.Semaphore(MAX_CONCURRENT)

    async def one(port: int) -> tuple[str, str]:
        async with sem:
            return await probe_port(target.host, port, target.source, timeout_s)

    answers = await asyncio.gather(*(one(e.port) for e in target.ports))
    return ProbeResult(target.node_id, target.host, target.source, at,
                       tuple(PortResult(e.port, e.expect, outcome, detail)
                             for e, (outcome, detail) in zip(target.ports, answers, strict=True)))
