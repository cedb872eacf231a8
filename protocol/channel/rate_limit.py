"""Rate limits on incoming handshakes: token buckets per source, with an optional global bucket.

Sans-IO like the rest of `protocol/`: the caller passes monotonic milliseconds. The daemon's mesh
listener asks `HandshakeRateLimiter.allow` before it starts a `SecureSession` for a new connection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from protocol.errors import LocalProtocolError

__all__ = ["HandshakeRateLimiter"]


class HandshakeRateLimiter:
    """Token buckets per source (e.g. remote IP): `rate_per_s` handshakes a second, bursts of `burst`.

    Memory is bounded by `max_sources`: when full, the least recently seen source is forgotten. That is
    exact for any source idle for `burst / rate_per_s` seconds (its bucket would be full again anyway);
    only a flood of more than `max_sources` sources within that window loses state, and the optional
    `total_rate_per_s` bucket caps that case.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_sources: int = 10_000,
        total_rate_per_s: float | None = None,
        total_burst: int | None = None,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_sources < 1:
            raise LocalProtocolError("rate_per_s, burst and max_sources must be positive")
        if total_rate_per_s is not None and total_rate_per_s <= 0:
            raise LocalProtocolError("total_rate_per_s must be positive")
        self._rate_per_ms = rate_per_s / 1000.0
        self._burst = float(burst)
        self._max_sources = max_sources
        self._buckets: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # source -> (tokens, at_ms)
        self._total_rate_per_ms = None if total_rate_per_s is None else total_rate_per_s / 1000.0
        self._total_burst = float(
            total_burst if total_burst is not None else max(burst, int(total_rate_per_s or 1))
        )
        self._total: tuple[float, int] | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: Hashable, now_ms: int) -> bool:
        """Take one token for `source`; False means refuse this handshake attempt. A refused attempt
        costs nothing; a clock that steps back adds no tokens."""
        buckets = self._buckets
        entry = buckets.get(source)
        tokens, at_ms = self._refill(entry, self._burst, self._rate_per_ms, now_ms)
        if tokens < 1.0:
            buckets[source] = (tokens, at_ms)
            buckets.move_to_end(source)
            return False
        if self._total_rate_per_ms is not None:
            total, total_at_ms = self._refill(self._total, self._total_burst, self._total_rate_per_ms, now_ms)
            if total < 1.0:
                self._total = (total, total_at_ms)
                return False
            self._total = (total - 1.0, total_at_ms)
        if entry is None and len(buckets) >= self._max_sources:
            buckets.popitem(last=False)
        buckets[source] = (tokens - 1.0, at_ms)
        buckets.move_to_end(source)
        return True

    @staticmethod
    def _refill(
        entry: tuple[float, int] | None, burst: float, rate_per_ms: float, now_ms: int
    ) -> tuple[float, int]:
        if entry is None:
            return burst, now_ms
        tokens, at_ms = entry
        if now_ms <= at_ms:
            return tokens, at_ms
        return min(burst, tokens + (now_ms - at_ms) * rate_per_ms), now_ms
